/* Preloaded into engine processes (LD_PRELOAD, see bind_host.py): a bind() to the wildcard
 * address (0.0.0.0 or ::) becomes a bind to PDSERVE_BIND_HOST, the engine's advertise host.
 * Mooncake's transfer engine binds its handshake and data listeners to the wildcard and has no
 * setting for it; every other listener of an engine already names its host. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int host_family;            /* 0: no host given, every bind passes through */
static struct in_addr host_v4;
static struct in6_addr host_v6;

__attribute__((constructor)) static void read_host(void) {
    real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    const char *host = getenv("PDSERVE_BIND_HOST");
    if (!host) return;
    if (inet_pton(AF_INET, host, &host_v4) == 1) host_family = AF_INET;
    else if (inet_pton(AF_INET6, host, &host_v6) == 1) host_family = AF_INET6;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (!real_bind) read_host();
    if (host_family == AF_INET && addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)
        && ((const struct sockaddr_in *)addr)->sin_addr.s_addr == htonl(INADDR_ANY)) {
        struct sockaddr_in a = *(const struct sockaddr_in *)addr;
        a.sin_addr = host_v4;
        return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
    if (host_family && addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)
        && IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)addr)->sin6_addr)) {
        struct sockaddr_in6 a = *(const struct sockaddr_in6 *)addr;
        if (host_family == AF_INET6) {
            a.sin6_addr = host_v6;
        } else {                   /* an IPv6 socket on an IPv4 host: ::ffff:a.b.c.d */
            memset(&a.sin6_addr, 0, 10);
            memset((char *)&a.sin6_addr + 10, 0xff, 2);
            memcpy((char *)&a.sin6_addr + 12, &host_v4, 4);
        }
        return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
    return real_bind(fd, addr, len);
}
