// ferry-hold: holds the packets that reach a locked network namespace, and hands them to it once
// the container there runs (packages/agent/src/net/hold.ts, net/lock.ts).
//
// A locked namespace queues what arrives from elsewhere to NFQUEUE 49428 (0xC114) instead of
// dropping it. A client whose segments are dropped during a migration's downtime backs its
// retransmission timer off (200, 400, 800 ms...), and so resumes well after the restore; held
// segments are delivered the moment the restore ends, and their ACKs restart the client at once.
// With no listener bound, the kernel drops what the rule queues, as the plain lock would.
//
// One process serves every namespace of an agent. Lines on stdin, one answer line each on stdout:
//   hold KEY NETNS-PATH   bind the namespace's queue (a netlink socket made inside it)  -> ok KEY
//   release KEY           accept everything queued so far, then unbind                  -> ok KEY N
//   drop KEY              unbind: the kernel drops what was queued                      -> ok KEY
// A failure answers "error KEY reason". KEY has no blanks. The process exits when stdin closes;
// what it held is then dropped.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define QUEUE 0xC114
#define MAX_HOLDS 256

struct hold {
  char key[128];
  int fd;
  uint32_t seq, max_id, count;
  int have;
};

static struct hold holds[MAX_HOLDS];
static int nholds;

struct msg {
  char buf[256];
  size_t len;
};

static void begin(struct msg *m, struct hold *h, uint16_t type) {
  memset(m, 0, sizeof *m);
  struct nlmsghdr *n = (struct nlmsghdr *)m->buf;
  n->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | type;
  n->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  n->nlmsg_seq = ++h->seq;
  struct nfgenmsg *g = NLMSG_DATA(n);
  g->nfgen_family = AF_UNSPEC;
  g->version = NFNETLINK_V0;
  g->res_id = htons(QUEUE);
  m->len = NLMSG_LENGTH(sizeof *g);
}

static void attr(struct msg *m, uint16_t type, const void *d, size_t n) {
  struct nlattr *a = (struct nlattr *)(m->buf + NLMSG_ALIGN(m->len));
  a->nla_type = type;
  a->nla_len = NLA_HDRLEN + n;
  memcpy((char *)a + NLA_HDRLEN, d, n);
  m->len = NLMSG_ALIGN(m->len) + NLA_ALIGN(a->nla_len);
}

/* Notes the packets a batch of netlink messages announces; the ACK of `seq` if it holds one (1, or
   -errno), else 0. */
static int absorb(struct hold *h, char *buf, ssize_t n, uint32_t seq) {
  int acked = 0;
  for (struct nlmsghdr *m = (struct nlmsghdr *)buf; NLMSG_OK(m, n); m = NLMSG_NEXT(m, n)) {
    if (m->nlmsg_type == NLMSG_ERROR) {
      struct nlmsgerr *e = NLMSG_DATA(m);
      if (seq && m->nlmsg_seq == seq) acked = e->error ? e->error : 1;
      continue;
    }
    if (m->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)) continue;
    char *p = (char *)NLMSG_DATA(m) + NLMSG_ALIGN(sizeof(struct nfgenmsg));
    char *end = (char *)m + m->nlmsg_len;
    while (p + NLA_HDRLEN <= end) {
      struct nlattr *a = (struct nlattr *)p;
      if (a->nla_len < NLA_HDRLEN || p + a->nla_len > end) break;
      if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR && a->nla_len >= NLA_HDRLEN + sizeof(struct nfqnl_msg_packet_hdr)) {
        uint32_t id = ntohl(((struct nfqnl_msg_packet_hdr *)(p + NLA_HDRLEN))->packet_id);
        if (!h->have || id > h->max_id) h->max_id = id;
        h->have = 1;
        h->count++;
      }
      p += NLA_ALIGN(a->nla_len);
    }
  }
  return acked;
}

/* Sends a request and reads until its ACK; 0 or -errno. */
static int request(struct hold *h, struct msg *m) {
  struct nlmsghdr *n = (struct nlmsghdr *)m->buf;
  n->nlmsg_len = m->len;
  struct sockaddr_nl to = {.nl_family = AF_NETLINK};
  if (sendto(h->fd, m->buf, m->len, 0, (struct sockaddr *)&to, sizeof to) < 0) return -errno;
  static char buf[65536];
  for (;;) {
    ssize_t r = recv(h->fd, buf, sizeof buf, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    int a = absorb(h, buf, r, n->nlmsg_seq);
    if (a) return a > 0 ? 0 : a;
  }
}

/* What has arrived so far, without waiting. */
static void drain(struct hold *h) {
  static char buf[65536];
  ssize_t r;
  while ((r = recv(h->fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) absorb(h, buf, r, 0);
}

static struct hold *find(const char *key) {
  for (int i = 0; i < nholds; i++)
    if (!strcmp(holds[i].key, key)) return &holds[i];
  return NULL;
}

static void forget(struct hold *h) {
  close(h->fd);
  *h = holds[--nholds];
}

__attribute__((format(printf, 1, 2))) static void reply(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  fflush(stdout);
}

/* A netlink socket made inside the namespace at `path`, bound to its queue; -errno on failure. */
static int bind_queue(const char *path, struct hold *h) {
  int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (self < 0) return -errno;
  int ns = open(path, O_RDONLY | O_CLOEXEC);
  if (ns < 0) {
    int e = -errno;
    close(self);
    return e;
  }
  int err = 0;
  if (setns(ns, CLONE_NEWNET)) err = -errno;
  else {
    h->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
    if (h->fd < 0) err = -errno;
    if (setns(self, CLONE_NEWNET)) {
      perror("ferry-hold: back to our own namespace");
      exit(1);
    }
  }
  close(ns);
  close(self);
  if (err) return err;
  int one = 1, rcvbuf = 4 << 20;
  setsockopt(h->fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
  setsockopt(h->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_nl me = {.nl_family = AF_NETLINK};
  if (bind(h->fd, (struct sockaddr *)&me, sizeof me)) err = -errno;
  struct msg m;
  begin(&m, h, NFQNL_MSG_CONFIG);
  struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND, .pf = htons(AF_INET)};
  attr(&m, NFQA_CFG_CMD, &cmd, sizeof cmd);
  /* The packets' ids are all we need: no payload crosses. */
  struct nfqnl_msg_config_params par = {.copy_range = htonl(0), .copy_mode = NFQNL_COPY_META};
  attr(&m, NFQA_CFG_PARAMS, &par, sizeof par);
  uint32_t maxlen = htonl(4096);
  attr(&m, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof maxlen);
  if (!err) err = request(h, &m);
  if (err) close(h->fd);
  return err;
}

static void command(char *line) {
  char *verb = strtok(line, " \n"), *key = strtok(NULL, " \n"), *arg = strtok(NULL, "\n");
  if (!verb || !key || strlen(key) >= sizeof holds[0].key) {
    reply("error - a malformed command\n");
    return;
  }
  struct hold *h = find(key);
  if (!strcmp(verb, "hold")) {
    if (h) {
      reply("ok %s\n", key); /* already held */
      return;
    }
    if (!arg || nholds == MAX_HOLDS) {
      reply("error %s %s\n", key, arg ? "too many holds" : "no namespace path");
      return;
    }
    struct hold n = {0};
    strcpy(n.key, key);
    int e = bind_queue(arg, &n);
    if (e) reply("error %s %s: %s\n", key, arg, strerror(-e));
    else {
      holds[nholds++] = n;
      reply("ok %s\n", key);
    }
  } else if (!strcmp(verb, "release") || !strcmp(verb, "drop")) {
    if (!h) {
      reply("ok %s 0\n", key);
      return;
    }
    uint32_t n = 0;
    int e = 0;
    if (verb[0] == 'r') {
      drain(h);
      n = h->count;
      if (h->have) {
        struct msg m;
        begin(&m, h, NFQNL_MSG_VERDICT_BATCH);
        struct nfqnl_msg_verdict_hdr v = {.verdict = htonl(NF_ACCEPT), .id = htonl(h->max_id)};
        attr(&m, NFQA_VERDICT_HDR, &v, sizeof v);
        e = request(h, &m);
      }
    }
    forget(h);
    if (e) reply("error %s verdict: %s\n", key, strerror(-e));
    else reply("ok %s %u\n", key, n);
  } else reply("error %s unknown command %s\n", key, verb);
}

int main(void) {
  char line[4096];
  size_t have = 0;
  for (;;) {
    struct pollfd f[1 + MAX_HOLDS];
    f[0] = (struct pollfd){.fd = 0, .events = POLLIN};
    for (int i = 0; i < nholds; i++) f[1 + i] = (struct pollfd){.fd = holds[i].fd, .events = POLLIN};
    if (poll(f, 1 + nholds, -1) < 0) {
      if (errno == EINTR) continue;
      perror("ferry-hold: poll");
      return 1;
    }
    for (int i = 0; i < nholds; i++)
      if (f[1 + i].revents) drain(&holds[i]);
    if (f[0].revents) {
      ssize_t r = read(0, line + have, sizeof line - 1 - have);
      if (r <= 0) return 0;
      have += (size_t)r;
      char *nl;
      while ((nl = memchr(line, '\n', have))) {
        *nl = 0;
        command(line);
        size_t used = (size_t)(nl - line) + 1;
        memmove(line, nl + 1, have - used);
        have -= used;
      }
      if (have == sizeof line - 1) have = 0; /* a line this long is no command */
    }
  }
}
