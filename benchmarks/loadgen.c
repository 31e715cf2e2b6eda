/*
 * loadgen: a socketmap load generator that talks like Postfix.
 *
 * Many TCP connections to one daemon on loopback; on each connection one request at a time (the
 * next is sent when the reply to the previous one has arrived), many requests per connection.
 * One thread, epoll, no allocation on the request path: it costs a few microseconds of CPU per
 * request, so on a small machine the daemon under test, not this program, is what is measured.
 *
 * Modes
 *   timed (default): every connection sends keys round-robin from the key list for --warmup
 *       seconds (not measured), then for --duration seconds (measured), then stops sending and
 *       waits (bounded) for the replies still outstanding.
 *   --once: connect every connection first, then send each key of the list exactly once, spread
 *       over the connections (a connection takes the next unsent key when its reply arrives), and
 *       finish when every key is answered or --timeout expires.
 *
 * With --pid PID it reads utime+stime of that process from /proc/PID/stat at the start and the end
 * of the measured window, so the daemon's CPU time per answered request is exact for the window.
 *
 * Output: one JSON object on stdout. Everything is bounded: --timeout (default 60 s) ends any run.
 *
 * Build: gcc -O2 -o loadgen loadgen.c   (benchmarks/loadgen.py does this on first use)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define INBUF 8192
#define MAX_EVENTS 256

struct conn {
    int fd;
    int busy;            /* a request is outstanding */
    int closed;
    uint64_t sent_ns;    /* when the outstanding request was sent */
    size_t next_key;     /* timed mode: next key index of this connection */
    size_t inlen;
    char in[INBUF];
};

struct key {
    char *frame;         /* the whole netstring request */
    size_t len;
};

static struct key *keys;
static size_t nkeys;
static struct conn *conns;
static int nconns;

static uint32_t *lat_us;  /* latencies (microseconds) of replies in the measured window */
static size_t nlat, caplat;

static uint64_t n_ok, n_notfound, n_temp, n_other, n_errors, n_answered_total;
static int n_outstanding;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static long long proc_cpu_ticks(int pid) {
    if (pid <= 0) return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    /* The command name (field 2) may hold spaces: count fields after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p += 2; /* field 3 */
    long long utime = 0, stime = 0;
    int field = 3;
    char *save = NULL;
    for (char *tok = strtok_r(p, " ", &save); tok; tok = strtok_r(NULL, " ", &save), field++) {
        if (field == 14) utime = atoll(tok);
        if (field == 15) { stime = atoll(tok); break; }
    }
    return utime + stime;
}

static double self_cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void add_key(const char *name, const char *key) {
    size_t payload = strlen(name) + 1 + strlen(key);
    char head[32];
    int hl = snprintf(head, sizeof head, "%zu:", payload);
    struct key k;
    k.len = (size_t)hl + payload + 1;
    k.frame = malloc(k.len + 1);
    if (!k.frame) die("malloc");
    snprintf(k.frame, k.len + 1, "%s%s %s,", head, name, key);
    keys = realloc(keys, (nkeys + 1) * sizeof *keys);
    if (!keys) die("realloc");
    keys[nkeys++] = k;
}

static void load_keys(const char *path, const char *name) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    char line[2048];
    while (fgets(line, sizeof line, f)) {
        size_t l = strlen(line);
        while (l && (line[l - 1] == '\n' || line[l - 1] == '\r')) line[--l] = 0;
        if (l) add_key(name, line);
    }
    fclose(f);
    if (!nkeys) {
        fprintf(stderr, "loadgen: no keys in %s\n", path);
        exit(2);
    }
}

static void record_latency(uint64_t ns) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat_us = realloc(lat_us, caplat * sizeof *lat_us);
        if (!lat_us) die("realloc");
    }
    uint64_t us = ns / 1000;
    lat_us[nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int send_frame(struct conn *c, const struct key *k) {
    /* Requests are small: a loopback socket takes one whole or the connection is broken. */
    ssize_t n = send(c->fd, k->frame, k->len, MSG_NOSIGNAL);
    if (n != (ssize_t)k->len) return -1;
    c->busy = 1;
    n_outstanding++;
    c->sent_ns = now_ns();
    return 0;
}

static void close_conn(int ep, struct conn *c) {
    if (c->closed) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->closed = 1;
    if (c->busy) {
        n_errors++;
        n_outstanding--;
    }
    c->busy = 0;
}

/* One complete reply in c->in? Returns its total length and sets payload and plen; 0 if incomplete;
 * -1 if malformed. */
static long parse_reply(struct conn *c, const char **payload, size_t *plen) {
    size_t i = 0, len = 0;
    while (i < c->inlen && c->in[i] >= '0' && c->in[i] <= '9') {
        len = len * 10 + (size_t)(c->in[i] - '0');
        if (len > INBUF) return -1;
        i++;
    }
    if (i == c->inlen) return 0;
    if (i == 0 || c->in[i] != ':') return -1;
    if (c->inlen < i + 1 + len + 1) {
        if (i + 1 + len + 1 > INBUF) return -1;
        return 0;
    }
    if (c->in[i + 1 + len] != ',') return -1;
    *payload = c->in + i + 1;
    *plen = len;
    return (long)(i + 1 + len + 1);
}

static void classify(const char *p, size_t n) {
    if (n >= 3 && memcmp(p, "OK ", 3) == 0) n_ok++;
    else if (n >= 9 && memcmp(p, "NOTFOUND ", 9) == 0) n_notfound++;
    else if ((n >= 5 && memcmp(p, "TEMP ", 5) == 0) || (n >= 8 && memcmp(p, "TIMEOUT ", 8) == 0))
        n_temp++;
    else n_other++;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port PORT --keys FILE [--host 127.0.0.1] [--name postfix]\n"
            "               [--conns N] [--duration S] [--warmup S] [--once] [--timeout S]\n"
            "               [--pid PID]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *name = "postfix", *keyfile = NULL;
    int port = 0, once = 0, pid = 0;
    double duration = 3.0, warmup = 0.5, timeout = 60.0;
    nconns = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--once")) { once = 1; continue; }
        if (!v) usage();
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--name")) name = v;
        else if (!strcmp(a, "--keys")) keyfile = v;
        else if (!strcmp(a, "--conns")) nconns = atoi(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--timeout")) timeout = atof(v);
        else if (!strcmp(a, "--pid")) pid = atoi(v);
        else usage();
        i++;
    }
    if (!port || !keyfile || nconns < 1 || nconns > 20000 || timeout <= 0) usage();
    signal(SIGPIPE, SIG_IGN);
    load_keys(keyfile, name);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)nconns + 64 ? rl.rlim_max : (rlim_t)nconns + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    uint64_t start_ns = now_ns();
    uint64_t hard_deadline = start_ns + (uint64_t)(timeout * 1e9);

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host must be an IPv4 address\n");
        return 2;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    conns = calloc((size_t)nconns, sizeof *conns);
    if (!conns) die("calloc");
    int connect_failures = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* A blocking connect, bounded by SO_SNDTIMEO: a full backlog makes it wait, not fail. */
        struct timeval tv = {5, 0};
        setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            close(c->fd);
            c->closed = 1;
            connect_failures++;
            continue;
        }
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        c->next_key = (size_t)(((uint64_t)i * nkeys) / (uint64_t)nconns);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) die("epoll_ctl");
        if (now_ns() > hard_deadline) break;
    }
    uint64_t connected_ns = now_ns();

    /* The measured window. --once: from the first send to the last reply. */
    uint64_t t0, t1;
    size_t once_next = 0, once_answered = 0;
    if (once) {
        t0 = connected_ns;
        t1 = hard_deadline;
    } else {
        t0 = connected_ns + (uint64_t)(warmup * 1e9);
        t1 = t0 + (uint64_t)(duration * 1e9);
        if (t1 > hard_deadline) t1 = hard_deadline;
    }
    long long cpu0 = -1, cpu1 = -1;
    double self0 = 0, self1 = 0;
    int phase = 0; /* 0: warm-up, 1: measured window, 2: after it */
    if (once) {
        cpu0 = proc_cpu_ticks(pid);
        self0 = self_cpu_seconds();
        phase = 1;
    }

    /* First requests. */
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->closed) continue;
        size_t k;
        if (once) {
            if (once_next >= nkeys) break;
            k = once_next++;
        } else {
            k = c->next_key++ % nkeys;
        }
        if (send_frame(c, &keys[k]) != 0) close_conn(ep, c);
    }

    int sending = 1;
    uint64_t last_reply_ns = t0;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        uint64_t now = now_ns();
        if (!once && phase == 0 && now >= t0) {
            phase = 1;
            cpu0 = proc_cpu_ticks(pid);
            self0 = self_cpu_seconds();
        }
        if (!once && phase == 1 && now >= t1) {
            phase = 2;
            sending = 0;
            cpu1 = proc_cpu_ticks(pid);
            self1 = self_cpu_seconds();
        }
        int outstanding = n_outstanding;
        if (once && once_answered + (size_t)n_errors >= nkeys) break;
        if (!sending && outstanding == 0) break;
        if (once && outstanding == 0 && once_next >= nkeys) break;
        if (now >= hard_deadline) break;
        /* After the window, replies still in flight get at most 5 s more. */
        if (!sending && now >= t1 + 5000000000ull) break;
        if (!outstanding && sending && !once) {
            /* Every connection failed. */
            break;
        }
        uint64_t wake = hard_deadline;
        if (!once && sending) wake = phase == 1 ? t1 : t0;
        int ms = (int)((wake > now ? wake - now : 0) / 1000000ull) + 1;
        if (ms > 100) ms = 100;
        int n = epoll_wait(ep, events, MAX_EVENTS, ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            struct conn *c = &conns[events[e].data.u32];
            if (c->closed) continue;
            ssize_t r = recv(c->fd, c->in + c->inlen, INBUF - c->inlen, 0);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                close_conn(ep, c);
                continue;
            }
            c->inlen += (size_t)r;
            for (;;) {
                const char *payload;
                size_t plen;
                long used = parse_reply(c, &payload, &plen);
                if (used == 0) break;
                if (used < 0 || !c->busy) {
                    n_other++;
                    close_conn(ep, c);
                    break;
                }
                uint64_t done = now_ns();
                c->busy = 0;
                n_outstanding--;
                n_answered_total++;
                if (once || (done >= t0 && done < t1)) {
                    record_latency(done - c->sent_ns);
                    classify(payload, plen);
                    last_reply_ns = done;
                }
                memmove(c->in, c->in + used, c->inlen - (size_t)used);
                c->inlen -= (size_t)used;
                if (once) {
                    once_answered++;
                    if (once_next < nkeys) {
                        if (send_frame(c, &keys[once_next++]) != 0) close_conn(ep, c);
                    }
                } else if (sending && done < t1) {
                    if (send_frame(c, &keys[c->next_key++ % nkeys]) != 0) close_conn(ep, c);
                }
                if (c->closed) break;
            }
        }
    }
    if (once) {
        cpu1 = proc_cpu_ticks(pid);
        self1 = self_cpu_seconds();
        t1 = last_reply_ns;
    } else if (cpu1 < 0) {
        cpu1 = proc_cpu_ticks(pid);
        self1 = self_cpu_seconds();
    }
    size_t unanswered = 0;
    for (int i = 0; i < nconns; i++) {
        if (conns[i].busy) unanswered++;
        if (!conns[i].closed) close(conns[i].fd);
    }
    if (once && once_next < nkeys) unanswered += nkeys - once_next;

    double elapsed = (double)(t1 - t0) / 1e9;
    if (elapsed <= 0) elapsed = 1e-9;
    uint32_t p50 = 0, p90 = 0, p99 = 0, pmax = 0;
    if (nlat) {
        qsort(lat_us, nlat, sizeof *lat_us, cmp_u32);
        p50 = lat_us[(nlat - 1) * 50 / 100];
        p90 = lat_us[(nlat - 1) * 90 / 100];
        p99 = lat_us[(nlat - 1) * 99 / 100];
        pmax = lat_us[nlat - 1];
    }
    long hz = sysconf(_SC_CLK_TCK);
    double daemon_cpu = (cpu0 >= 0 && cpu1 >= 0) ? (double)(cpu1 - cpu0) / (double)hz : -1.0;
    printf("{\"answered\": %zu, \"elapsed\": %.6f, \"rps\": %.1f, \"p50_us\": %u, \"p90_us\": %u,"
           " \"p99_us\": %u, \"max_us\": %u, \"ok\": %llu, \"notfound\": %llu, \"temp\": %llu,"
           " \"other\": %llu, \"errors\": %llu, \"unanswered\": %zu, \"connect_failures\": %d,"
           " \"daemon_cpu_s\": %.3f, \"loadgen_cpu_s\": %.3f, \"connect_s\": %.6f}\n",
           nlat, elapsed, (double)nlat / elapsed, p50, p90, p99, pmax,
           (unsigned long long)n_ok, (unsigned long long)n_notfound, (unsigned long long)n_temp,
           (unsigned long long)n_other, (unsigned long long)n_errors, unanswered, connect_failures,
           daemon_cpu, self1 - self0, (double)(connected_ns - start_ns) / 1e9);
    return 0;
}
