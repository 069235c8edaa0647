/* Tiny TCP echo server for deploy/host/verify.sh (built static, runs as a container's only process).
 * usage: echo-server PORT
 * Replies to every line with "n=<count> <line>", where count is a process-wide counter kept in
 * memory: after a checkpoint/restore the count must continue, which shows that memory survived. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned long served;

static void serve(int c) {
    char buf[4096], line[4096 + 32];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(c, buf + used, sizeof(buf) - used);
        if (n <= 0) return;
        used += (size_t)n;
        char *nl;
        while ((nl = memchr(buf, '\n', used)) != NULL) {
            size_t len = (size_t)(nl - buf) + 1;
            int m = snprintf(line, sizeof(line), "n=%lu %.*s", ++served, (int)len, buf);
            if (write(c, line, (size_t)m) != m) return;
            memmove(buf, buf + len, used - len);
            used -= len;
        }
        if (used == sizeof(buf)) used = 0; /* overlong line: drop it */
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7000, one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 16) < 0) {
        perror("echo-server");
        return 1;
    }
    printf("echo-server listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        serve(c);
        close(c);
    }
}
