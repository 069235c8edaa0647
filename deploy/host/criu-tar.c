/* criu-tar: what CRIU runs as "tar" for Ferry's containers (the agent puts its directory first on
 * runc's PATH, which CRIU inherits).
 *
 * CRIU saves every tmpfs mount of a container with `tar --create --gzip ...` at dump and puts it
 * back with `tar --extract --gzip ...` at restore: a tar and a gzip process per mount and per
 * side, one after another, inside the downtime (a runc container has four: /dev, /dev/shm and
 * runc's two masked directories, /proc/acpi and /sys/firmware, of which only /dev has entries).
 * For an EMPTY mount this program writes the same archive itself: a gzip member with one stored
 * (uncompressed) deflate block holding a POSIX tar of the single entry "./" (the directory's
 * mode, owner and mtime), which GNU tar and gzip read like any other. At restore it recognises
 * exactly such an archive and applies that entry to the mount's root, as GNU tar would.
 * Anything else (other arguments, a mount with entries, an archive it did not write, a value a
 * tar header cannot hold) goes to the real tar, with stdin untouched: $FERRY_REAL_TAR, else
 * /usr/bin/tar, else /bin/tar.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
/* the "./" header and the two zero blocks that end an archive */
#define TAR_LEN (3 * BLOCK)
/* gzip header, one stored block (header byte, LEN, NLEN), the tar, CRC-32 and ISIZE */
#define GZ_LEN (10 + 5 + TAR_LEN + 8)

/* MTIME 0, XFL 0, OS 255 ("unknown"): gzip itself writes OS 3, so the restore side knows its own */
static const uint8_t GZ_HEAD[10] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255};

static const char *const CREATE[] = {"--create", "--gzip", "--no-unquote", "--no-wildcards", "--one-file-system",
                                     "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner",
                                     "--directory"};
static const char *const EXTRACT[] = {"--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory"};
#define N(a) (sizeof(a) / sizeof((a)[0]))

__attribute__((noreturn)) static void real_tar(char **argv) {
    const char *t = getenv("FERRY_REAL_TAR");
    if (!t || !*t) t = access("/usr/bin/tar", X_OK) == 0 ? "/usr/bin/tar" : "/bin/tar";
    argv[0] = (char *)t;
    execv(t, argv);
    fprintf(stderr, "criu-tar: cannot run %s: %s\n", t, strerror(errno));
    _exit(127);
}

/* argv[1..n] are `want`, in order; argv[n + 1] is the directory, then `tail` (or nothing) ends it */
static const char *matches(int argc, char **argv, const char *const *want, size_t n, const char *tail) {
    if ((size_t)argc != n + 2 + (tail ? 1 : 0)) return NULL;
    for (size_t i = 0; i < n; i++)
        if (strcmp(argv[i + 1], want[i])) return NULL;
    if (tail && strcmp(argv[n + 2], tail)) return NULL;
    return argv[n + 1];
}

static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & -(c & 1));
    }
    return ~c;
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

/* an octal field of `width` bytes: width - 1 digits and a NUL; 0 if the value does not fit */
static int octal(char *f, size_t width, unsigned long long v) {
    if (width - 1 < 22 && v >> (3 * (width - 1))) return 0;
    snprintf(f, width, "%0*llo", (int)(width - 1), v);
    return 1;
}

static unsigned header_sum(const uint8_t *h) {
    unsigned s = 0;
    for (int i = 0; i < BLOCK; i++) s += (i >= 148 && i < 156) ? ' ' : h[i];
    return s;
}

/* --create of an empty directory: the archive on stdout. 0 when it is not ours to write. */
static int create(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    DIR *d = fstat(fd, &st) == 0 ? fdopendir(fd) : NULL;
    if (!d) {
        close(fd);
        return 0;
    }
    struct dirent *e;
    int empty = 1;
    while (empty && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
    closedir(d);
    if (!empty || st.st_mtime < 0) return 0;

    static uint8_t out[GZ_LEN];
    uint8_t *tar = out + 15;
    memcpy(out, GZ_HEAD, 10);
    out[10] = 1; /* BFINAL, stored */
    out[11] = TAR_LEN & 0xff, out[12] = TAR_LEN >> 8;
    out[13] = ~TAR_LEN & 0xff, out[14] = (~TAR_LEN >> 8) & 0xff;
    char *h = (char *)tar;
    memcpy(h, "./", 2);
    if (!octal(h + 100, 8, st.st_mode & 07777) || !octal(h + 108, 8, st.st_uid) || !octal(h + 116, 8, st.st_gid) ||
        !octal(h + 124, 12, 0) || !octal(h + 136, 12, (unsigned long long)st.st_mtime))
        return 0;
    h[156] = '5';
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    snprintf(h + 148, 8, "%06o", header_sum(tar));
    h[155] = ' ';
    put32(out + 15 + TAR_LEN, crc32(tar, TAR_LEN));
    put32(out + 19 + TAR_LEN, TAR_LEN);
    for (size_t done = 0; done < GZ_LEN;) {
        ssize_t w = write(1, out + done, GZ_LEN - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            perror("criu-tar: write");
            exit(2);
        }
        done += (size_t)w;
    }
    return 1;
}

static unsigned long long field(const uint8_t *f, size_t width, int *ok) {
    unsigned long long v = 0;
    size_t i = 0;
    for (; i < width - 1 && f[i] >= '0' && f[i] <= '7'; i++) v = v * 8 + (f[i] - '0');
    if (i != width - 1 || f[i]) *ok = 0;
    return v;
}

/* --extract of an archive create() wrote: apply its entry to `dir`. 0 when it is not one. */
static int extract(const char *dir) {
    static uint8_t in[GZ_LEN + 1];
    if (pread(0, in, sizeof in, 0) != GZ_LEN) return 0; /* a pipe, a shorter or a longer file */
    const uint8_t *tar = in + 15;
    if (memcmp(in, GZ_HEAD, 10) || in[10] != 1 || (in[11] | in[12] << 8) != TAR_LEN ||
        (in[13] | in[14] << 8) != (~TAR_LEN & 0xffff) || get32(in + 15 + TAR_LEN) != crc32(tar, TAR_LEN) ||
        get32(in + 19 + TAR_LEN) != TAR_LEN)
        return 0;
    int ok = memcmp(tar, "./\0", 3) == 0 && tar[156] == '5' && memcmp(tar + 257, "ustar\0" "00", 8) == 0;
    for (int i = 3; i < 100; i++) ok &= tar[i] == 0;
    for (int i = BLOCK; i < TAR_LEN; i++) ok &= tar[i] == 0;
    mode_t mode = (mode_t)field(tar + 100, 8, &ok);
    uid_t uid = (uid_t)field(tar + 108, 8, &ok);
    gid_t gid = (gid_t)field(tar + 116, 8, &ok);
    unsigned long long size = field(tar + 124, 12, &ok);
    time_t mtime = (time_t)field(tar + 136, 12, &ok);
    unsigned long long sum = field(tar + 148, 7, &ok);
    if (!ok || size != 0 || sum != header_sum(tar) || tar[155] != ' ') return 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const struct timespec times[2] = {{.tv_nsec = UTIME_OMIT}, {.tv_sec = mtime}};
    /* as GNU tar sets a directory's status: owner first (it clears set-id bits), then mode */
    if (fd < 0 || fchown(fd, uid, gid) || fchmod(fd, mode) || futimens(fd, times)) {
        fprintf(stderr, "criu-tar: %s: %s\n", dir, strerror(errno));
        exit(2);
    }
    close(fd);
    return 1;
}

int main(int argc, char **argv) {
    const char *dir;
    if ((dir = matches(argc, argv, CREATE, N(CREATE), ".")) && create(dir)) return 0;
    if ((dir = matches(argc, argv, EXTRACT, N(EXTRACT), NULL)) && extract(dir)) return 0;
    real_tar(argv);
}
