/* ferry-echo: a TCP service whose state lives only in memory, for checkpoint/restore tests.
 *
 * usage: ferry-echo PORT [MEMORY_MIB]
 *
 * On every accepted connection the server first sends a 16-byte header:
 *   "FEC1" | serial (u32, big endian) | total (u64, big endian)
 * where `serial` is a process-wide connection counter (1, 2, ...) and `total` the number of bytes
 * the process has echoed so far over all connections. It then echoes every byte transformed by
 * the connection's running byte offset and its serial:
 *   out[i] = in[i] ^ ((i + serial) & 0xff)
 * A client can thus check byte by byte that nothing was lost or duplicated, and that the process
 * that answers is the same one (a restarted server restarts offsets, serials and totals).
 * MEMORY_MIB (default 0) allocates and touches that much memory, to make dumps bigger.
 * Logs one line per event on stdout (the container log). Single-threaded, poll()-based.
 * SIGTERM exits with status 143. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 64
#define BUF 65536

struct conn {
    int fd;
    uint32_t serial;
    uint64_t offset;          /* bytes received (and transformed) on this connection */
    unsigned char out[BUF];   /* transformed bytes not yet written */
    size_t out_len, out_pos;
};

static struct conn conns[MAX_CONNS];
static uint32_t conn_serial; /* process-wide: connections accepted so far */
static uint64_t total_bytes; /* process-wide: bytes echoed so far */

/* As PID 1 of its namespace the process gets no default action for SIGTERM (the kernel drops
 * it): handle it, so that a graceful stop works and exits 128+15 like a killed process. */
static void on_term(int sig) { (void)sig; _exit(143); }

static void put_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--, v >>= 8) p[i] = (unsigned char)(v & 0xff);
}

static void drop(struct conn *c) {
    printf("ferry-echo: conn %u closed after %llu bytes\n", c->serial, (unsigned long long)c->offset);
    fflush(stdout);
    close(c->fd);
    c->fd = -1;
}

static void accept_one(int ls) {
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) return;
    struct conn *c = NULL;
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd < 0) { c = &conns[i]; break; }
    if (!c) { close(fd); return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    c->fd = fd;
    c->serial = ++conn_serial;
    c->offset = 0;
    memcpy(c->out, "FEC1", 4);
    put_be(c->out + 4, c->serial, 4);
    put_be(c->out + 8, total_bytes, 8);
    c->out_len = 16;
    c->out_pos = 0;
    printf("ferry-echo: conn %u accepted (total %llu)\n", c->serial, (unsigned long long)total_bytes);
    fflush(stdout);
}

static void flush_out(struct conn *c) {
    while (c->out_pos < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_pos, c->out_len - c->out_pos);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            drop(c);
            return;
        }
        c->out_pos += (size_t)n;
    }
    c->out_len = c->out_pos = 0;
}

static void read_some(struct conn *c) {
    unsigned char buf[BUF];
    size_t room = BUF - c->out_len;
    if (room == 0) return;
    ssize_t n = read(c->fd, buf, room);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) { drop(c); return; }
    if (n < 0) return;
    for (ssize_t i = 0; i < n; i++, c->offset++)
        c->out[c->out_len++] = buf[i] ^ (unsigned char)((c->offset + c->serial) & 0xff);
    total_bytes += (uint64_t)n;
    flush_out(c);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7000, one = 1;
    long mib = argc > 2 ? atol(argv[2]) : 0;
    if (mib > 0) {
        /* touched memory, so the dump has real pages to write */
        unsigned char *m = malloc((size_t)mib << 20);
        if (!m) { perror("ferry-echo: malloc"); return 1; }
        for (size_t i = 0; i < ((size_t)mib << 20); i += 64) m[i] = (unsigned char)(i >> 6);
    }
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < MAX_CONNS; i++) conns[i].fd = -1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 16) < 0) {
        perror("ferry-echo");
        return 1;
    }
    printf("ferry-echo listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        struct pollfd p[MAX_CONNS + 1];
        int idx[MAX_CONNS + 1], n = 0;
        p[n].fd = ls; p[n].events = POLLIN; idx[n++] = -1;
        for (int i = 0; i < MAX_CONNS; i++) {
            if (conns[i].fd < 0) continue;
            p[n].fd = conns[i].fd;
            /* stop reading while output is pending: back-pressure instead of unbounded buffers */
            p[n].events = conns[i].out_len > conns[i].out_pos ? POLLOUT : POLLIN;
            idx[n++] = i;
        }
        if (poll(p, (nfds_t)n, -1) < 0) continue;
        for (int k = 0; k < n; k++) {
            if (!p[k].revents) continue;
            if (idx[k] < 0) { accept_one(ls); continue; }
            struct conn *c = &conns[idx[k]];
            if (c->fd < 0) continue;
            if (c->out_len > c->out_pos) flush_out(c);
            else read_some(c);
        }
    }
}
