// delaywire: a two-port Ethernet "wire" that delays and rate-limits frames, netem-style, for
// kernels without sch_netem. It joins two interfaces with AF_PACKET sockets and forwards every
// frame from one to the other, in both directions, holding each frame for a fixed one-way delay
// and, optionally, serialising it at a fixed rate (a token-free FIFO link model: a frame leaves
// at max(now, previous departure) + len*8/rate, then waits the delay).
//
//   delaywire IF_A IF_B DELAY_A_TO_B_US DELAY_B_TO_A_US RATE_A_TO_B_BPS RATE_B_TO_A_BPS
//
// A rate of 0 means unlimited. Frames queued beyond QUEUE_BYTES per direction are dropped (a
// tail-drop queue, as a shaped NIC would). SIGTERM/SIGINT: exit 0 after printing counters per
// direction: forwarded, dropped (the tail-drop queue, by design), lost (a frame too large to read
// whole, or a failed send) and kernel_drops (frames the kernel dropped because the wire did not
// read them in time). A link the benchmark can trust shows 0 for the last two.
// Built and run by bench/shaping.ts inside the testbed's underlay namespace.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 65536
#define QUEUE_BYTES (8 * 1024 * 1024)

struct frame {
  struct frame *next;
  uint64_t due_ns;
  size_t len;
  unsigned char data[];
};

struct dir {
  int in_fd, out_fd;
  uint64_t delay_ns;
  uint64_t rate_bps;
  uint64_t last_departure_ns;
  struct frame *head, *tail;
  size_t queued;
  unsigned long fwd, dropped, lost;
};

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int open_port(const char *ifname) {
  int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
  if (fd < 0) { perror("socket"); exit(1); }
  unsigned idx = if_nametoindex(ifname);
  if (!idx) { fprintf(stderr, "no interface %s\n", ifname); exit(1); }
  struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = (int)idx};
  if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); exit(1); }
  // Frames for other MACs pass through us: the port must be promiscuous.
  struct packet_mreq mr = {.mr_ifindex = (int)idx, .mr_type = PACKET_MR_PROMISC};
  if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) < 0) { perror("promisc"); exit(1); }
  int big = 8 << 20;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  return fd;
}

static void receive(struct dir *d, unsigned char *buf) {
  for (;;) {
    struct sockaddr_ll from;
    socklen_t fl = sizeof from;
    // MSG_TRUNC: n is the frame's real length, so a frame larger than the buffer is counted, not cut
    ssize_t n = recvfrom(d->in_fd, buf, MAX_FRAME, MSG_TRUNC, (struct sockaddr *)&from, &fl);
    if (n < 0) return;  // EAGAIN: drained
    // An AF_PACKET socket also sees what is sent out of its interface (our own forwarding).
    if (from.sll_pkttype == PACKET_OUTGOING) continue;
    if (n > MAX_FRAME) { d->lost++; continue; }
    if (d->queued + (size_t)n > QUEUE_BYTES) { d->dropped++; continue; }
    struct frame *f = malloc(sizeof *f + (size_t)n);
    if (!f) { d->dropped++; continue; }
    uint64_t t = now_ns();
    if (d->rate_bps) {
      uint64_t start = d->last_departure_ns > t ? d->last_departure_ns : t;
      d->last_departure_ns = start + (uint64_t)n * 8ull * 1000000000ull / d->rate_bps;
      t = d->last_departure_ns;
    }
    f->due_ns = t + d->delay_ns;
    f->len = (size_t)n;
    f->next = NULL;
    memcpy(f->data, buf, (size_t)n);
    if (d->tail) d->tail->next = f; else d->head = f;
    d->tail = f;
    d->queued += (size_t)n;
  }
}

// Sends every due frame; returns ns until the next one is due (or -1 when the queue is empty).
static int64_t flush(struct dir *d) {
  uint64_t t = now_ns();
  while (d->head && d->head->due_ns <= t) {
    struct frame *f = d->head;
    if (send(d->out_fd, f->data, f->len, 0) < 0) {
      if (errno == EAGAIN) return 100000;  // retry in 0.1 ms
      d->lost++;
    } else {
      d->fwd++;
    }
    d->head = f->next;
    if (!d->head) d->tail = NULL;
    d->queued -= f->len;
    free(f);
  }
  return d->head ? (int64_t)(d->head->due_ns - t) : -1;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s IF_A IF_B DELAY_AB_US DELAY_BA_US RATE_AB_BPS RATE_BA_BPS\n", argv[0]);
    return 2;
  }
  int a = open_port(argv[1]), b = open_port(argv[2]);
  struct dir dirs[2] = {
      {.in_fd = a, .out_fd = b, .delay_ns = strtoull(argv[3], 0, 10) * 1000ull, .rate_bps = strtoull(argv[5], 0, 10)},
      {.in_fd = b, .out_fd = a, .delay_ns = strtoull(argv[4], 0, 10) * 1000ull, .rate_bps = strtoull(argv[6], 0, 10)},
  };
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  unsigned char *buf = malloc(MAX_FRAME);
  printf("ready\n");
  fflush(stdout);
  while (!stop) {
    int64_t wait = -1;
    for (int i = 0; i < 2; i++) {
      int64_t w = flush(&dirs[i]);
      if (w >= 0 && (wait < 0 || w < wait)) wait = w;
    }
    struct pollfd p[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    struct timespec ts = {.tv_sec = 0, .tv_nsec = 200000000};
    if (wait >= 0) { ts.tv_sec = wait / 1000000000; ts.tv_nsec = wait % 1000000000; }
    int r = ppoll(p, 2, &ts, NULL);
    if (r < 0 && errno != EINTR) { perror("ppoll"); return 1; }
    if (p[0].revents & POLLIN) receive(&dirs[0], buf);
    if (p[1].revents & POLLIN) receive(&dirs[1], buf);
  }
  // Frames the kernel dropped before we read them (our socket's queue was full): a wire that was
  // not scheduled in time, which a real link never is.
  struct tpacket_stats st[2] = {0};
  socklen_t sl = sizeof st[0];
  getsockopt(a, SOL_PACKET, PACKET_STATISTICS, &st[0], &sl);
  sl = sizeof st[1];
  getsockopt(b, SOL_PACKET, PACKET_STATISTICS, &st[1], &sl);
  fprintf(stderr, "a->b fwd=%lu dropped=%lu lost=%lu kernel_drops=%u; b->a fwd=%lu dropped=%lu lost=%lu kernel_drops=%u\n",
          dirs[0].fwd, dirs[0].dropped, dirs[0].lost, st[0].tp_drops, dirs[1].fwd, dirs[1].dropped, dirs[1].lost,
          st[1].tp_drops);
  return 0;
}
