// ferry-spawn: runs programs for a Node process that should not fork itself (packages/common/src/exec.ts,
// the launcher). Node forks with fork() and copies the page tables of its whole heap for every program;
// this helper is a few hundred KiB and starts each program with posix_spawn (glibc: clone(CLONE_VM |
// CLONE_VFORK), no page tables copied). It runs any number of programs at once, feeds each its input,
// captures its output (8 MiB a stream, the rest read and dropped), SIGKILLs it on its timeout or when
// asked, and answers when it has exited and closed both outputs (Node's "close").
//
// Frames on stdin (requests) and stdout (answers): u32 length, then the body; integers little-endian;
// str = u32 length + bytes.
//   run:    u8 1, u32 id, u32 timeout_ms, u8 flags (1: env follows, 2: cwd follows), str command,
//           u32 argc, argc x str (argv[0] first), [u32 envc, envc x str "K=V"], [str cwd], str input
//   kill:   u8 2, u32 id
//   answer: u32 id, u8 how (0 exited, 1 killed by a signal, 2 not started), i32 exit code, signal
//           number or errno, u8 why (0, 1 timeout, 2 aborted), u32 duration in us, str stdout, str stderr
// A command without '/' is looked up in the PATH of the environment it runs with, as libuv does.
// The helper exits when its stdin closes (its parent is gone), leaving running programs be.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAX_CAPTURE (8u << 20)
#define MAX_FRAME (256u << 20)

struct buf {
  char *p;
  size_t len, cap;
};

static void die(const char *what) {
  fprintf(stderr, "ferry-spawn: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void put(struct buf *b, const void *d, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) die("realloc");
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, d, n);
  b->len += n;
}

static void put_u32(struct buf *b, uint32_t v) {
  unsigned char x[4] = {v, v >> 8, v >> 16, v >> 24};
  put(b, x, 4);
}

struct child {
  uint32_t id;
  pid_t pid;
  int out, err, in; /* our ends; -1 once closed */
  struct buf o, e;
  size_t o_seen, e_seen;
  char *input;
  size_t input_len, input_off;
  int64_t deadline_ms;
  int exited, status, killed;
  uint8_t why;
  int64_t started_us;
  struct child *next;
};

static struct child *children;
static int sig_pipe[2];

static int64_t now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static void on_sigchld(int sig) {
  (void)sig;
  int saved = errno;
  if (write(sig_pipe[1], "c", 1) < 0) { /* the pipe is full: a wake-up is pending anyway */
  }
  errno = saved;
}

static void write_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      exit(0); /* our parent is gone */
    }
    p += w;
    n -= (size_t)w;
  }
}

static void answer(uint32_t id, uint8_t how, int32_t value, uint8_t why, int64_t started_us, const struct buf *o,
                   const struct buf *e) {
  struct buf b = {0};
  put_u32(&b, 0); /* length, below */
  put_u32(&b, id);
  put(&b, &how, 1);
  put_u32(&b, (uint32_t)value);
  put(&b, &why, 1);
  int64_t d = now_us() - started_us;
  put_u32(&b, d > 0 && d < UINT32_MAX ? (uint32_t)d : 0);
  put_u32(&b, o ? (uint32_t)o->len : 0);
  if (o && o->len) put(&b, o->p, o->len);
  put_u32(&b, e ? (uint32_t)e->len : 0);
  if (e && e->len) put(&b, e->p, e->len);
  uint32_t n = (uint32_t)(b.len - 4);
  unsigned char x[4] = {n, n >> 8, n >> 16, n >> 24};
  memcpy(b.p, x, 4);
  write_all(1, b.p, b.len);
  free(b.p);
}

static void answer_error(uint32_t id, int err, const char *command, int64_t started_us) {
  struct buf e = {0};
  char msg[600];
  int n = snprintf(msg, sizeof msg, "spawn %.500s %s", command, strerrorname_np(err) ? strerrorname_np(err) : "error");
  put(&e, msg, (size_t)n);
  answer(id, 2, err, 0, started_us, NULL, &e);
  free(e.p);
}

/* A frame's fields, read in order; any overrun marks the frame bad. */
struct reader {
  const unsigned char *p, *end;
  int bad;
};

static uint32_t get_u32(struct reader *r) {
  if (r->end - r->p < 4) {
    r->bad = 1;
    return 0;
  }
  uint32_t v = r->p[0] | r->p[1] << 8 | r->p[2] << 16 | (uint32_t)r->p[3] << 24;
  r->p += 4;
  return v;
}

static uint8_t get_u8(struct reader *r) {
  if (r->end - r->p < 1) {
    r->bad = 1;
    return 0;
  }
  return *r->p++;
}

/* A NUL-terminated copy of the next str. */
static char *get_str(struct reader *r, size_t *len) {
  uint32_t n = get_u32(r);
  if (r->bad || (size_t)(r->end - r->p) < n) {
    r->bad = 1;
    return NULL;
  }
  char *s = malloc((size_t)n + 1);
  if (!s) die("malloc");
  memcpy(s, r->p, n);
  s[n] = 0;
  r->p += n;
  if (len) *len = n;
  return s;
}

static char **get_strs(struct reader *r, uint32_t n) {
  if (n > 1u << 20) {
    r->bad = 1;
    return NULL;
  }
  char **v = calloc((size_t)n + 1, sizeof *v);
  if (!v) die("calloc");
  for (uint32_t i = 0; i < n && !r->bad; i++) v[i] = get_str(r, NULL);
  return v;
}

static void free_strs(char **v) {
  if (!v) return;
  for (char **s = v; *s; s++) free(*s);
  free(v);
}

static const char *path_of(char **env) {
  if (!env) return getenv("PATH");
  for (char **s = env; *s; s++)
    if (!strncmp(*s, "PATH=", 5)) return *s + 5;
  return NULL;
}

/* posix_spawn, with the PATH search execvp does; 0 or an errno. */
static int spawn_program(pid_t *pid, const char *command, const posix_spawn_file_actions_t *fa, const posix_spawnattr_t *at,
                         char **argv, char **env) {
  char **envp = env ? env : environ;
  if (strchr(command, '/')) return posix_spawn(pid, command, fa, at, argv, envp);
  if (!*command) return ENOENT;
  const char *path = path_of(env);
  if (!path) path = "/usr/local/bin:/usr/bin:/bin";
  int err = ENOENT, eacces = 0;
  for (const char *d = path;; d++) {
    const char *end = strchrnul(d, ':');
    char full[4096];
    size_t dl = (size_t)(end - d);
    if (dl + strlen(command) + 2 <= sizeof full) {
      if (dl) memcpy(full, d, dl);
      else full[dl++] = '.'; /* an empty entry is the current directory */
      full[dl] = '/';
      strcpy(full + dl + 1, command);
      err = posix_spawn(pid, full, fa, at, argv, envp);
      if (!err) return 0;
      if (err == EACCES) eacces = 1;
      else if (err != ENOENT && err != ENOTDIR && err != ELOOP && err != ENAMETOOLONG) return err;
    }
    if (!*end) break;
    d = end;
  }
  return eacces ? EACCES : err;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void start(struct reader *r) {
  int64_t started = now_us();
  uint32_t id = get_u32(r), timeout_ms = get_u32(r);
  uint8_t flags = get_u8(r);
  char *command = get_str(r, NULL);
  char **argv = get_strs(r, get_u32(r));
  char **env = (flags & 1) ? get_strs(r, get_u32(r)) : NULL;
  char *cwd = (flags & 2) ? get_str(r, NULL) : NULL;
  size_t input_len = 0;
  char *input = get_str(r, &input_len);
  if (r->bad || r->p != r->end) {
    fprintf(stderr, "ferry-spawn: a malformed request\n");
    exit(2);
  }
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) die("pipe2");
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  if (cwd) posix_spawn_file_actions_addchdir_np(&fa, cwd);
  posix_spawnattr_init(&at);
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&at, &all);
  posix_spawnattr_setsigmask(&at, &none);
  posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  pid_t pid;
  int e = spawn_program(&pid, command, &fa, &at, argv, env);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&at);
  close(in[0]);
  close(out[1]);
  close(err[1]);
  if (e) {
    close(in[1]);
    close(out[0]);
    close(err[0]);
    answer_error(id, e, command, started);
    free(input);
  } else {
    struct child *c = calloc(1, sizeof *c);
    if (!c) die("calloc");
    c->id = id;
    c->pid = pid;
    c->in = in[1];
    c->out = out[0];
    c->err = err[0];
    c->input = input;
    c->input_len = input_len;
    c->started_us = started;
    c->deadline_ms = started / 1000 + timeout_ms;
    fcntl(c->in, F_SETFL, O_NONBLOCK);
    if (!input_len) close_fd(&c->in);
    c->next = children;
    children = c;
  }
  free(command);
  free_strs(argv);
  free_strs(env);
  free(cwd);
}

static void kill_child(uint32_t id, uint8_t why) {
  for (struct child *c = children; c; c = c->next) {
    if (c->id != id) continue;
    if (!c->why) c->why = why;
    if (!c->exited) kill(c->pid, SIGKILL);
    c->killed = 1;
  }
}

/* Reads what the stream has; 0 at its end (or on an error), 1 otherwise. */
static int drain(int fd, struct buf *b, size_t *seen) {
  char tmp[65536];
  ssize_t n = read(fd, tmp, sizeof tmp);
  if (n < 0) return errno == EINTR || errno == EAGAIN;
  if (n == 0) return 0;
  if (*seen < MAX_CAPTURE) put(b, tmp, (size_t)n < MAX_CAPTURE - *seen ? (size_t)n : MAX_CAPTURE - *seen);
  *seen += (size_t)n;
  return 1;
}

static void reap(void) {
  int st;
  pid_t pid;
  while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
    for (struct child *c = children; c; c = c->next)
      if (c->pid == pid) {
        c->exited = 1;
        c->status = st;
      }
}

/* Answers for, and forgets, every program that has exited and closed both outputs. */
static void finish(void) {
  for (struct child **pp = &children; *pp;) {
    struct child *c = *pp;
    if (!c->exited || c->out >= 0 || c->err >= 0) {
      pp = &c->next;
      continue;
    }
    close_fd(&c->in);
    if (WIFSIGNALED(c->status)) answer(c->id, 1, WTERMSIG(c->status), c->why, c->started_us, &c->o, &c->e);
    else answer(c->id, 0, WEXITSTATUS(c->status), c->why, c->started_us, &c->o, &c->e);
    *pp = c->next;
    free(c->o.p);
    free(c->e.p);
    free(c->input);
    free(c);
  }
}

int main(void) {
  if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK)) die("pipe2");
  struct sigaction sa = {0};
  sa.sa_handler = on_sigchld;
  sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
  sigaction(SIGCHLD, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  fcntl(0, F_SETFD, FD_CLOEXEC);
  fcntl(1, F_SETFD, FD_CLOEXEC);
  struct buf req = {0};
  size_t nfds_cap = 0;
  struct pollfd *fds = NULL;
  struct child **owner = NULL;
  for (;;) {
    size_t n = 0, need = 2;
    for (struct child *c = children; c; c = c->next) need += 3;
    if (need > nfds_cap) {
      nfds_cap = need * 2;
      fds = realloc(fds, nfds_cap * sizeof *fds);
      owner = realloc(owner, nfds_cap * sizeof *owner);
      if (!fds || !owner) die("realloc");
    }
    fds[n++] = (struct pollfd){.fd = 0, .events = POLLIN};
    fds[n++] = (struct pollfd){.fd = sig_pipe[0], .events = POLLIN};
    int64_t now = now_us() / 1000, wait_ms = -1;
    for (struct child *c = children; c; c = c->next) {
      if (c->out >= 0) owner[n] = c, fds[n++] = (struct pollfd){.fd = c->out, .events = POLLIN};
      if (c->err >= 0) owner[n] = c, fds[n++] = (struct pollfd){.fd = c->err, .events = POLLIN};
      if (c->in >= 0) owner[n] = c, fds[n++] = (struct pollfd){.fd = c->in, .events = POLLOUT};
      if (!c->killed) {
        if (c->deadline_ms <= now) {
          kill_child(c->id, 1);
        } else if (wait_ms < 0 || c->deadline_ms - now < wait_ms) wait_ms = c->deadline_ms - now;
      }
    }
    if (poll(fds, n, (int)wait_ms) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (fds[1].revents) {
      char tmp[64];
      while (read(sig_pipe[0], tmp, sizeof tmp) > 0) {
      }
      reap();
    }
    for (size_t i = 2; i < n; i++) {
      if (!fds[i].revents) continue;
      struct child *c = owner[i];
      if (fds[i].fd == c->out) {
        if (!drain(c->out, &c->o, &c->o_seen)) close_fd(&c->out);
      } else if (fds[i].fd == c->err) {
        if (!drain(c->err, &c->e, &c->e_seen)) close_fd(&c->err);
      } else if (fds[i].fd == c->in) {
        ssize_t w = write(c->in, c->input + c->input_off, c->input_len - c->input_off);
        if (w > 0) c->input_off += (size_t)w;
        /* done, or the program stopped reading (EPIPE): its input ends here */
        if ((w < 0 && errno != EAGAIN && errno != EINTR) || c->input_off == c->input_len) close_fd(&c->in);
      }
    }
    finish();
    if (fds[0].revents) {
      char tmp[65536];
      ssize_t r = read(0, tmp, sizeof tmp);
      if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) exit(0);
      if (r > 0) put(&req, tmp, (size_t)r);
      size_t off = 0;
      while (req.len - off >= 4) {
        const unsigned char *p = (const unsigned char *)req.p + off;
        uint32_t len = p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
        if (len > MAX_FRAME || len == 0) {
          fprintf(stderr, "ferry-spawn: a frame of %u bytes\n", len);
          exit(2);
        }
        if (req.len - off - 4 < len) break;
        struct reader rd = {p + 4, p + 4 + len, 0};
        uint8_t kind = get_u8(&rd);
        if (kind == 1) start(&rd);
        else if (kind == 2) {
          uint32_t id = get_u32(&rd);
          kill_child(id, 2);
        } else {
          fprintf(stderr, "ferry-spawn: a request of kind %u\n", kind);
          exit(2);
        }
        off += 4 + len;
      }
      memmove(req.p, req.p + off, req.len - off);
      req.len -= off;
    }
  }
}
