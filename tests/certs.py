"""Real certificates for the TLS tests, made with the openssl command.

A ``CertMaker`` holds its CAs and issued certificates in one directory:
``ca("root")`` makes a self-signed CA; ``issue(ca, "name", ...)`` makes a
key and a certificate signed by it (a server one with SANs for loopback,
a client one, an expired one, or one with an encrypted key).
"""

import os
import subprocess
from dataclasses import dataclass
from typing import Optional

from tests.helpers import require_program


@dataclass
class Issued:
    name: str
    cert: str          # PEM certificate
    key: str           # PEM private key
    pem: str           # certificate and key in one file (websockify's self.pem)


@dataclass
class Authority:
    name: str
    cert: str
    key: str
    directory: str


_CA_CONFIG = """
[ ca ]
default_ca = this_ca
[ this_ca ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = anything
copy_extensions = copy
unique_subject = no
[ anything ]
commonName = supplied
[ server ]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost
[ client ]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


class CertMaker:
    def __init__(self, directory: str):
        self.openssl = require_program("openssl", "openssl")
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _run(self, *args: str, stdin: Optional[bytes] = None) -> None:
        done = subprocess.run([self.openssl] + list(args), input=stdin, capture_output=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError("openssl %s failed: %s" % (args[0], done.stderr.decode()[-800:]))

    def ca(self, name: str) -> Authority:
        directory = os.path.join(self.directory, name)
        os.makedirs(os.path.join(directory, "issued"), exist_ok=True)
        open(os.path.join(directory, "index.txt"), "w").close()
        with open(os.path.join(directory, "serial"), "w") as handle:
            handle.write("1000\n")
        with open(os.path.join(directory, "ca.cnf"), "w") as handle:
            handle.write(_CA_CONFIG.format(dir=directory))
        cert = os.path.join(directory, "ca.pem")
        key = os.path.join(directory, "ca.key")
        self._run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                  "-out", cert, "-days", "3", "-subj", "/CN=%s" % name,
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return Authority(name, cert, key, directory)

    def issue(self, ca: Authority, name: str, *, client: bool = False,
              expired: bool = False, key_password: Optional[str] = None) -> Issued:
        base = os.path.join(self.directory, name)
        key, csr, cert, pem = base + ".key", base + ".csr", base + ".pem", base + "-all.pem"
        self._run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                  "-subj", "/CN=%s" % name)
        dates = (["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]
                 if expired else ["-days", "3"])
        self._run("ca", "-batch", "-config", os.path.join(ca.directory, "ca.cnf"),
                  "-cert", ca.cert, "-keyfile", ca.key, "-in", csr, "-out", cert,
                  "-notext", "-extensions", "client" if client else "server", *dates)
        if key_password is not None:
            encrypted = base + ".enc.key"
            self._run("pkey", "-in", key, "-out", encrypted, "-aes256",
                      "-passout", "pass:%s" % key_password)
            key = encrypted
        with open(pem, "w") as out:
            for part in (cert, key):
                with open(part) as handle:
                    out.write(handle.read())
        return Issued(name, cert, key, pem)
