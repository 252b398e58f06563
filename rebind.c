/*
 * rebind: an LD_PRELOAD library that moves a wrapped program's listening
 * port onto the loopback address, so that websockify can listen on the
 * program's usual port and bridge WebSocket clients to it.
 *
 * A bind() of an AF_INET or AF_INET6 socket to port REBIND_OLD_PORT becomes
 * a bind to the loopback address at port REBIND_NEW_PORT:
 *   - AF_INET                           -> 127.0.0.1:NEW
 *   - AF_INET6, IPv6-only socket        -> [::1]:NEW
 *   - AF_INET6, dual-stack socket bound
 *     to :: or to an IPv4-mapped address -> [::ffff:127.0.0.1]:NEW
 * The last case keeps a dual-stack server reachable from websockify, which
 * connects to 127.0.0.1: bound to ::1 it would accept IPv6 clients only.
 *
 * Every other bind() -- other ports, other families, or missing or invalid
 * REBIND_* values -- is passed through unchanged.
 *
 * Built as websockify/_rebind*.so by setup.py (Python never imports it).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

typedef int (*bind_function)(int, const struct sockaddr *, socklen_t);

static bind_function real_bind;

/* A port from the environment: 1..65535, or 0 when missing or invalid. */
static unsigned short env_port(const char *name)
{
    const char *text = getenv(name);
    char *end;
    long value;

    if (text == NULL || *text == '\0')
        return 0;
    errno = 0;
    value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < 1 || value > 65535)
        return 0;
    return (unsigned short)value;
}

static int resolve_real_bind(void)
{
    if (real_bind == NULL)
        real_bind = (bind_function)dlsym(RTLD_NEXT, "bind");
    return real_bind != NULL;
}

__attribute__((constructor)) static void rebind_init(void)
{
    resolve_real_bind();
}

static int ipv6_only(int fd)
{
    int value = 0;
    socklen_t len = sizeof(value);

    if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &value, &len) != 0)
        return 1;
    return value != 0;
}

/* The moved port is reused on every respawn: let a new listener take it
 * while connections of the previous run linger in TIME_WAIT. Stream
 * sockets only: on datagram sockets SO_REUSEADDR would let two share it. */
static void allow_port_reuse(int fd)
{
    int type = 0, on = 1;
    socklen_t len = sizeof(type);

    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
}

static int bind_ipv4(int fd, const struct sockaddr_in *given, unsigned short new_port)
{
    struct sockaddr_in moved;

    memcpy(&moved, given, sizeof(moved));
    moved.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    moved.sin_port = htons(new_port);
    allow_port_reuse(fd);
    return real_bind(fd, (const struct sockaddr *)&moved, sizeof(moved));
}

static int bind_ipv6(int fd, const struct sockaddr_in6 *given, unsigned short new_port)
{
    static const struct in6_addr mapped_loopback = {
        { { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1 } }
    };
    struct sockaddr_in6 moved;
    int dual_stack_any;

    memcpy(&moved, given, sizeof(moved));
    dual_stack_any = (IN6_IS_ADDR_UNSPECIFIED(&given->sin6_addr)
                      || IN6_IS_ADDR_V4MAPPED(&given->sin6_addr)) && !ipv6_only(fd);
    moved.sin6_addr = dual_stack_any ? mapped_loopback : in6addr_loopback;
    moved.sin6_port = htons(new_port);
    moved.sin6_scope_id = 0;
    allow_port_reuse(fd);
    return real_bind(fd, (const struct sockaddr *)&moved, sizeof(moved));
}

int bind(int fd, const struct sockaddr *addr, socklen_t addrlen)
{
    unsigned short old_port, new_port;

    if (!resolve_real_bind()) {
        errno = ENOSYS;
        return -1;
    }
    if (addr == NULL)
        return real_bind(fd, addr, addrlen);
    old_port = env_port("REBIND_OLD_PORT");
    new_port = env_port("REBIND_NEW_PORT");
    if (old_port == 0 || new_port == 0)
        return real_bind(fd, addr, addrlen);

    if (addr->sa_family == AF_INET && addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)addr;
        if (ntohs(in4->sin_port) == old_port)
            return bind_ipv4(fd, in4, new_port);
    } else if (addr->sa_family == AF_INET6 && addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        if (ntohs(in6->sin6_port) == old_port)
            return bind_ipv6(fd, in6, new_port);
    }
    return real_bind(fd, addr, addrlen);
}
