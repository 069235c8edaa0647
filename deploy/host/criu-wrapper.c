/* criu-wrapper: /opt/ferry/bin/criu, the private CRIU's entry point (built by setup.sh with the
 * prefix's paths compiled in).
 *
 * It runs CRIU through the prefix's own dynamic loader (no LD_LIBRARY_PATH: programs that CRIU
 * executes, such as iptables-restore, keep the system's libc), as the shell script it replaces
 * did. And it answers one question itself: runc starts `criu swrk N` once per checkpoint and once
 * per restore only to send a VERSION request (CriuReq type 10, two bytes on the wire), before the
 * `criu swrk 3` that does the work. That first process costs ~5 ms of wall and CPU time each,
 * inside the migration's downtime. The wrapper looks at the request without taking it
 * (MSG_PEEK): a VERSION request is answered with the bytes this very CRIU binary answered
 * before, kept in CRIU_PREFIX/version-response together with the binary's identity (device,
 * inode, size, mtime); anything else, or an answer not on record for this binary, goes to CRIU
 * with the request still queued. The record is made by asking CRIU the first time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#if !defined(CRIU_LOADER) || !defined(CRIU_LIBPATH) || !defined(CRIU_BINARY) || !defined(CRIU_VERSION_RECORD)
#error "build with -DCRIU_LOADER=... -DCRIU_LIBPATH=... -DCRIU_BINARY=... -DCRIU_VERSION_RECORD=... (setup.sh does)"
#endif

/* CriuReq { type: VERSION }: field 1, varint 10 */
static const unsigned char VERSION_REQ[2] = {0x08, 0x0a};
/* a CriuResp starts with type VERSION and success true */
static const unsigned char VERSION_RESP_HEAD[4] = {0x08, 0x0a, 0x10, 0x01};
#define MAX_RESP 4096

struct identity {
  uint64_t dev, ino, size, mtime_sec, mtime_nsec;
};

static void run_criu(char **argv) {
  int argc = 0;
  while (argv[argc]) argc++;
  char **args = calloc((size_t)argc + 6, sizeof(char *));
  if (!args) {
    perror("criu-wrapper");
    exit(127);
  }
  int n = 0;
  args[n++] = (char *)CRIU_LOADER;
  args[n++] = "--library-path";
  args[n++] = (char *)CRIU_LIBPATH;
  args[n++] = "--argv0";
  args[n++] = "criu";
  args[n++] = (char *)CRIU_BINARY;
  for (int i = 1; i < argc; i++) args[n++] = argv[i];
  args[n] = NULL;
  execv(CRIU_LOADER, args);
  fprintf(stderr, "criu-wrapper: cannot run %s: %s\n", CRIU_LOADER, strerror(errno));
  exit(127);
}

static int identity_of(struct identity *id) {
  struct stat st;
  if (stat(CRIU_BINARY, &st) != 0) return -1;
  *id = (struct identity){(uint64_t)st.st_dev, (uint64_t)st.st_ino, (uint64_t)st.st_size, (uint64_t)st.st_mtim.tv_sec,
                          (uint64_t)st.st_mtim.tv_nsec};
  return 0;
}

/* The recorded answer for this binary, or 0 bytes. Only a root-owned record nobody else can write counts. */
static ssize_t recorded(const struct identity *id, unsigned char *resp) {
  int fd = open(CRIU_VERSION_RECORD, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return 0;
  struct stat st;
  unsigned char buf[sizeof(struct identity) + MAX_RESP];
  ssize_t n = -1;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == 0 && !(st.st_mode & 022)) n = read(fd, buf, sizeof buf);
  close(fd);
  if (n < (ssize_t)(sizeof(struct identity) + sizeof VERSION_RESP_HEAD)) return 0;
  if (memcmp(buf, id, sizeof *id) != 0) return 0;
  n -= (ssize_t)sizeof *id;
  if (memcmp(buf + sizeof *id, VERSION_RESP_HEAD, sizeof VERSION_RESP_HEAD) != 0) return 0;
  memcpy(resp, buf + sizeof *id, (size_t)n);
  return n;
}

/* Ask CRIU itself, over a socket pair of our own, as runc would. */
static ssize_t ask_criu(unsigned char *resp) {
  int sp[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) != 0) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (dup2(sp[1], 3) < 0) _exit(127);
    char *argv[] = {"criu", "swrk", "3", NULL};
    run_criu(argv);
  }
  close(sp[1]);
  ssize_t n = -1;
  if (send(sp[0], VERSION_REQ, sizeof VERSION_REQ, 0) == (ssize_t)sizeof VERSION_REQ) n = recv(sp[0], resp, MAX_RESP, 0);
  close(sp[0]);
  int status;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (n < (ssize_t)sizeof VERSION_RESP_HEAD || memcmp(resp, VERSION_RESP_HEAD, sizeof VERSION_RESP_HEAD) != 0) return -1;
  return n;
}

static void record(const struct identity *id, const unsigned char *resp, ssize_t n) {
  char tmp[sizeof CRIU_VERSION_RECORD + 32];
  snprintf(tmp, sizeof tmp, "%s.%ld", CRIU_VERSION_RECORD, (long)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return; /* a read-only prefix: no record, every VERSION goes to CRIU */
  int ok = write(fd, id, sizeof *id) == (ssize_t)sizeof *id && write(fd, resp, (size_t)n) == n;
  ok = close(fd) == 0 && ok;
  if (!ok || rename(tmp, CRIU_VERSION_RECORD) != 0) unlink(tmp);
}

int main(int argc, char **argv) {
  /* `criu swrk FD`: runc's own requests come on fd 3, go-criu's version probe on whatever fd
   * number its socket had in runc (8, 9, ...) */
  char *end;
  long fd = argc == 3 && strcmp(argv[1], "swrk") == 0 ? strtol(argv[2], &end, 10) : -1;
  if (fd >= 0 && fd <= 1024 && *argv[2] && !*end) {
    unsigned char req[sizeof VERSION_REQ + 1];
    ssize_t n;
    do n = recv((int)fd, req, sizeof req, MSG_PEEK);
    while (n < 0 && errno == EINTR);
    struct identity id;
    if (n == (ssize_t)sizeof VERSION_REQ && memcmp(req, VERSION_REQ, sizeof VERSION_REQ) == 0 && identity_of(&id) == 0) {
      unsigned char resp[MAX_RESP];
      ssize_t len = recorded(&id, resp);
      if (len == 0) {
        len = ask_criu(resp);
        if (len > 0) record(&id, resp, len);
      }
      if (len > 0 && recv((int)fd, req, sizeof req, 0) == (ssize_t)sizeof VERSION_REQ) {
        if (send((int)fd, resp, (size_t)len, 0) == len) return 0;
        fprintf(stderr, "criu-wrapper: cannot answer VERSION: %s\n", strerror(errno));
        return 1;
      }
    }
  }
  run_criu(argv);
}
