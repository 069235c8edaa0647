/* ferry-echo-client: drives one ferry-echo connection and verifies every echoed byte.
 *
 * usage: ferry-echo-client HOST PORT [--rate BYTES_PER_S] [--chunk BYTES] [--duration S]
 *                                    [--drain S] [--gap-ms MS] [--connect-wait S]
 *
 * A refused connect (the server not listening yet: a container just started) is retried every
 * 50 ms for up to --connect-wait seconds (default 10). Refused attempts never reach the server's
 * accept, so the serial of the connection that succeeds is still 1.
 * Sends a deterministic byte stream (byte i = f(i)) at a steady rate, in chunks, and checks that
 * the echo is f(i) ^ ((i + serial) & 0xff) (see ferry-echo.c) for every byte, in order. Stops
 * sending after --duration seconds (default: until SIGTERM/SIGINT), then waits up to --drain
 * seconds (default 10) for the rest of the echo, and prints one JSON report on stdout:
 *   {"serial":..,"totalAtConnect":..,"sent":..,"checked":..,"errors":..,"firstErrorAt":..,
 *    "maxGapMs":..,"gaps":[{"atMs":..,"ms":..},..],"closed":..,"durationMs":..}
 * `gaps` lists every pause between two received chunks longer than --gap-ms (default 100) while
 * echo was outstanding: the client-seen pause of a checkpoint/restore.
 * On stderr: "connected serial=N total=T" once the header arrived, then one line per gap.
 * Exit status 0 only if every sent byte came back correct. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_GAPS 256

static volatile sig_atomic_t stop_requested;
static void on_signal(int s) { (void)s; stop_requested = 1; }

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* the stream's byte at offset i: cheap, deterministic, not periodic over short ranges */
static unsigned char stream_byte(uint64_t i) {
    uint64_t x = i * 0x9E3779B97F4A7C15ull;
    return (unsigned char)(x >> 56);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT [--rate B/s] [--chunk B] [--duration S] [--drain S] [--gap-ms MS] [--connect-wait S]\n",
                argv[0]);
        return 2;
    }
    double rate = 100000, duration = -1, drain = 10, gap_ms = 100, connect_wait = 10;
    long chunk = 1000;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--chunk")) chunk = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--drain")) drain = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--gap-ms")) gap_ms = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--connect-wait")) connect_wait = atof(argv[i + 1]);
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    if (chunk < 1 || chunk > 65536 || rate <= 0) { fprintf(stderr, "bad --chunk or --rate\n"); return 2; }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) { fprintf(stderr, "HOST must be an IPv4 address\n"); return 2; }
    int fd, one = 1;
    for (double give_up = now_ms() + connect_wait * 1e3;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) { perror("socket"); return 3; }
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) break;
        if (errno != ECONNREFUSED || now_ms() >= give_up) { perror("connect"); return 3; }
        close(fd);
        usleep(50000);
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

    unsigned char hdr[16];
    size_t hdr_len = 0;
    uint32_t serial = 0;
    uint64_t total = 0, sent = 0, checked = 0, errors = 0;
    long long first_error = -1;
    int closed = 0;
    double start = now_ms(), last_rx = start, max_gap = 0, stop_at = -1;
    struct { double at, ms; } gaps[MAX_GAPS];
    int ngaps = 0;
    unsigned char out[65536], in[65536];

    for (;;) {
        double t = now_ms();
        if (stop_at < 0 && (stop_requested || (duration >= 0 && t - start >= duration * 1e3))) stop_at = t;
        if (stop_at >= 0 && (checked >= sent || t - stop_at >= drain * 1e3)) break;
        if (closed) break;
        /* bytes due by now at the configured rate */
        uint64_t due = stop_at >= 0 || hdr_len < 16 ? sent : (uint64_t)((t - start) * rate / 1e3);
        short ev = POLLIN;
        if (due > sent) ev |= POLLOUT;
        struct pollfd p = {.fd = fd, .events = ev};
        int wait = due > sent ? 5 : (int)(1e3 * chunk / rate) + 1;
        if (wait > 50) wait = 50;
        if (poll(&p, 1, wait) < 0 && errno != EINTR) break;
        if (p.revents & POLLOUT) {
            uint64_t n = due - sent;
            if (n > (uint64_t)chunk) n = (uint64_t)chunk;
            for (uint64_t i = 0; i < n; i++) out[i] = stream_byte(sent + i);
            ssize_t w = write(fd, out, n);
            if (w > 0) sent += (uint64_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR) { closed = 1; }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = read(fd, in, sizeof(in));
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { closed = 1; continue; }
            if (r < 0) continue;
            double rx = now_ms();
            /* a pause counts only while echo was outstanding (or the header awaited) */
            double g = rx - last_rx;
            if (g > max_gap) max_gap = g;
            if (g > gap_ms) {
                if (ngaps < MAX_GAPS) { gaps[ngaps].at = last_rx - start; gaps[ngaps].ms = g; ngaps++; }
                fprintf(stderr, "gap %.0f ms at %.0f ms\n", g, last_rx - start);
            }
            last_rx = rx;
            ssize_t k = 0;
            while (hdr_len < 16 && k < r) hdr[hdr_len++] = in[k++];
            if (hdr_len == 16 && k > 0 && serial == 0) {
                if (memcmp(hdr, "FEC1", 4)) { fprintf(stderr, "bad header\n"); errors++; first_error = 0; closed = 1; continue; }
                for (int i = 4; i < 8; i++) serial = (serial << 8) | hdr[i];
                for (int i = 8; i < 16; i++) total = (total << 8) | hdr[i];
                fprintf(stderr, "connected serial=%u total=%llu\n", serial, (unsigned long long)total);
                start = last_rx = now_ms(); /* the rate clock starts with the header */
            }
            for (; k < r; k++, checked++) {
                unsigned char want = stream_byte(checked) ^ (unsigned char)((checked + serial) & 0xff);
                if (checked >= sent || in[k] != want) {
                    if (first_error < 0) first_error = (long long)checked;
                    errors++;
                }
            }
        }
        /* nothing outstanding: the silence is not a pause of the server */
        if (checked >= sent) last_rx = now_ms();
    }
    printf("{\"serial\":%u,\"totalAtConnect\":%llu,\"sent\":%llu,\"checked\":%llu,\"errors\":%llu,"
           "\"firstErrorAt\":%lld,\"maxGapMs\":%.1f,\"closed\":%s,\"durationMs\":%.0f,\"gaps\":[",
           serial, (unsigned long long)total, (unsigned long long)sent, (unsigned long long)checked,
           (unsigned long long)errors, first_error, max_gap, closed ? "true" : "false", now_ms() - start);
    for (int i = 0; i < ngaps; i++) printf("%s{\"atMs\":%.0f,\"ms\":%.1f}", i ? "," : "", gaps[i].at, gaps[i].ms);
    printf("]}\n");
    fflush(stdout);
    close(fd);
    return (errors == 0 && checked == sent && hdr_len == 16) ? 0 : 1;
}
