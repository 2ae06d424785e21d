/*
 * bench/loadgen.c - the repository's closed-loop HTTP/1.1 load driver (one thread, epoll), used by
 * bench/run.py and the bench/ scripts for streams (and for everything when wrk is missing). Per request it
 * records the time to the first response-body byte (TTFB: for an SSE stream the first event, i.e. the first token, "TTFT") and the
 * total time to the end of the response (the last chunk of a chunked body). wrk cannot report TTFB, which is why
 * this exists; wrk stays the driver for non-streaming runs (bench/wrk_post.lua).
 *
 * Build: gcc -O2 -o loadgen bench/loadgen.c        (Debian: apt-get install -y gcc libc6-dev)
 * Usage: loadgen -c CONNS -d SECONDS [-w WARMUP_S] [-m METHOD] [-b BODYFILE]
 *                [-H 'Name: value']... [-S] [-T TIMEOUT_S] http://127.0.0.1:PORT/path
 *   -w   warm-up seconds before the measured window (default 1): responses started earlier are not counted
 *   -S   expect an SSE body: responses whose body does not end with "data: [DONE]" count as errors;
 *        "data:" events are counted (events_in_window / events_total let run.py count streams longer than
 *        the window too)
 * Prints one JSON object on stdout: requests, rps, errors, ttfb_ms and total_ms (mean, p50, p90, p99, max).
 * Only loopback-style targets are intended.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_CONNECTING, ST_WRITING, ST_HEADERS, ST_BODY };
enum { B_LEN, B_CHUNK_SIZE, B_CHUNK_DATA, B_CHUNK_CRLF, B_TRAILER, B_EOF };

typedef struct {
    int fd, state, bstate;
    size_t woff;
    char hbuf[16384];
    size_t hlen;
    long long remaining;   /* content-length left or chunk bytes left */
    int chunked, close_after, status;
    char szline[32];
    int szlen;
    int trailer_nl;        /* trailer state: count of consecutive line ends */
    double t_start, t_first, t_last_event;
    int got_first;
    char tail[16];         /* last bytes of the decoded body */
    int taillen;
    int match;             /* "data:" matcher position */
    long events;
    long long body_bytes;
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static char *g_req;
static size_t g_reqlen;
static int g_sse = 0;
static double g_measure_start, g_end, g_timeout = 30.0;
static int g_epfd;

static double *lat_total, *lat_ttfb;
static size_t nlat, caplat, nttfb, capttfb;
static long long ev_window, ev_all, bytes_window;
static long n_ok, n_err_conn, n_err_read, n_err_timeout, n_non2xx, n_bad_sse, n_warm;
static long long tot_events, tot_bytes, n_connects;

static void record(double total) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 65536;
        lat_total = realloc(lat_total, caplat * sizeof(double));
        if (!lat_total) { perror("realloc"); exit(2); }
    }
    lat_total[nlat++] = total;
}

static void record_ttfb(double ttfb) {
    if (nttfb == capttfb) {
        capttfb = capttfb ? capttfb * 2 : 65536;
        lat_ttfb = realloc(lat_ttfb, capttfb * sizeof(double));
        if (!lat_ttfb) { perror("realloc"); exit(2); }
    }
    lat_ttfb[nttfb++] = ttfb;
}

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
    if (!n) return 0;
    double idx = p / 100.0 * (n - 1);
    size_t lo = (size_t)idx;
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double f = idx - lo;
    return v[lo] * (1 - f) + v[hi] * f;
}

static void conn_open(conn_t *c);
static void on_writable(conn_t *c);

static void conn_close(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
}

static void start_request(conn_t *c) {
    c->state = ST_WRITING;
    c->woff = 0;
    c->hlen = 0;
    c->status = 0;
    c->chunked = 0;
    c->close_after = 0;
    c->remaining = -1;
    c->got_first = 0;
    c->taillen = 0;
    c->match = 0;
    c->events = 0;
    c->body_bytes = 0;
    c->szlen = 0;
    c->trailer_nl = 0;
    c->t_start = now_s();
    on_writable(c);  /* write right away; falls back to EPOLLOUT on EAGAIN */
}

static void conn_open(conn_t *c) {
    c->fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    n_connects++;
    int r = connect(c->fd, (struct sockaddr *)&g_addr, g_addrlen);
    if (r < 0 && errno != EINPROGRESS) { n_err_conn++; close(c->fd); c->fd = -1; return; }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(g_epfd, EPOLL_CTL_ADD, c->fd, &ev);
    c->state = ST_CONNECTING;
    c->t_start = now_s();
}

static void body_bytes_seen(conn_t *c, const char *p, size_t n, double t) {
    static const char pat[] = "data:";
    if (n == 0) return;
    int inwin = t >= g_measure_start && t < g_end;
    if (!c->got_first) {
        c->got_first = 1;
        c->t_first = t;
        /* TTFB is recorded when the first body byte arrives, whether or not
           the response completes inside the window */
        if (c->t_start >= g_measure_start && t < g_end) record_ttfb(t - c->t_start);
    }
    c->body_bytes += n;
    if (inwin) bytes_window += n;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == pat[c->match]) {
            if (++c->match == 5) { c->events++; c->match = 0; ev_all++; if (inwin) ev_window++; }
        } else {
            c->match = (ch == 'd') ? 1 : 0;
        }
    }
    /* keep last 16 bytes */
    if (n >= sizeof c->tail) {
        memcpy(c->tail, p + n - sizeof c->tail, sizeof c->tail);
        c->taillen = sizeof c->tail;
    } else {
        int keep = (int)sizeof c->tail - (int)n;
        if (keep > c->taillen) keep = c->taillen;
        memmove(c->tail, c->tail + c->taillen - keep, keep);
        memcpy(c->tail + keep, p, n);
        c->taillen = keep + (int)n;
    }
}

static void response_done(conn_t *c, double t) {
    int ok = 1;
    if (c->status < 200 || c->status > 299) { n_non2xx++; ok = 0; }
    if (ok && g_sse) {
        /* body must end with "data: [DONE]" followed by blank line(s) */
        char tmp[17];
        memcpy(tmp, c->tail, c->taillen);
        tmp[c->taillen] = 0;
        if (!strstr(tmp, "[DONE]")) { n_bad_sse++; ok = 0; }
    }
    if (c->t_start >= g_measure_start) {
        if (ok) {
            n_ok++;
            record(t - c->t_start);
            tot_events += c->events;
            tot_bytes += c->body_bytes;
        }
    } else {
        n_warm++;
    }
    if (c->close_after) {
        conn_close(c);
        if (t < g_end) conn_open(c);
    } else if (t < g_end) {
        start_request(c);
    } else {
        conn_close(c);
    }
}

/* parse the status line + headers in c->hbuf[0..hend) */
static void parse_headers(conn_t *c, size_t hend) {
    c->hbuf[hend] = 0;
    char *p = c->hbuf;
    if (strncmp(p, "HTTP/1.", 7) == 0) c->status = atoi(p + 9);
    if (strncmp(p, "HTTP/1.0", 8) == 0) c->close_after = 1;
    char *line = strstr(p, "\r\n");
    while (line && line < c->hbuf + hend) {
        line += 2;
        char *eol = strstr(line, "\r\n");
        if (!eol) break;
        if (!strncasecmp(line, "content-length:", 15)) c->remaining = atoll(line + 15);
        else if (!strncasecmp(line, "transfer-encoding:", 18)) {
            char save = *eol; *eol = 0;
            if (strcasestr(line + 18, "chunked")) c->chunked = 1;
            *eol = save;
        } else if (!strncasecmp(line, "connection:", 11)) {
            char save = *eol; *eol = 0;
            if (strcasestr(line + 11, "close")) c->close_after = 1;
            *eol = save;
        }
        line = eol;
    }
    if (c->chunked) { c->bstate = B_CHUNK_SIZE; c->szlen = 0; }
    else if (c->remaining >= 0) c->bstate = B_LEN;
    else { c->bstate = B_EOF; c->close_after = 1; }
}

/* feed body bytes; returns 1 when the response is complete */
static int feed_body(conn_t *c, const char *p, size_t n, double t) {
    size_t i = 0;
    while (i < n) {
        switch (c->bstate) {
        case B_LEN: {
            size_t take = n - i;
            if ((long long)take > c->remaining) take = (size_t)c->remaining;
            body_bytes_seen(c, p + i, take, t);
            c->remaining -= take;
            i += take;
            if (c->remaining == 0) return 1;
            break;
        }
        case B_EOF:
            body_bytes_seen(c, p + i, n - i, t);
            return 0;
        case B_CHUNK_SIZE: {
            char ch = p[i++];
            if (ch == '\n') {
                c->szline[c->szlen] = 0;
                long long sz = strtoll(c->szline, NULL, 16);
                c->szlen = 0;
                if (sz == 0) { c->bstate = B_TRAILER; c->trailer_nl = 1; }
                else { c->remaining = sz; c->bstate = B_CHUNK_DATA; }
            } else if (ch != '\r' && c->szlen < (int)sizeof c->szline - 1) {
                c->szline[c->szlen++] = ch;
            }
            break;
        }
        case B_CHUNK_DATA: {
            size_t take = n - i;
            if ((long long)take > c->remaining) take = (size_t)c->remaining;
            body_bytes_seen(c, p + i, take, t);
            c->remaining -= take;
            i += take;
            if (c->remaining == 0) { c->bstate = B_CHUNK_CRLF; c->szlen = 0; }
            break;
        }
        case B_CHUNK_CRLF: {
            char ch = p[i++];
            if (ch == '\n') c->bstate = B_CHUNK_SIZE;
            break;
        }
        case B_TRAILER: {
            /* after "0\r\n": trailer lines until an empty line */
            char ch = p[i++];
            if (ch == '\n') {
                if (c->trailer_nl) { /* empty line -> done */
                    if (i != n) { /* pipelined junk: ignore */ }
                    return 1;
                }
                c->trailer_nl = 1;
            } else if (ch != '\r') {
                c->trailer_nl = 0;
            }
            break;
        }
        }
    }
    return 0;
}

static void on_readable(conn_t *c) {
    char buf[65536];
    for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        double t = now_s();
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            n_err_read++;
            conn_close(c);
            if (t < g_end) conn_open(c);
            return;
        }
        if (r == 0) {
            if (c->state == ST_BODY && c->bstate == B_EOF) { response_done(c, t); if (c->fd >= 0) { conn_close(c); if (t < g_end) conn_open(c);} return; }
            if (c->state != ST_WRITING || c->woff) n_err_read++;
            conn_close(c);
            if (t < g_end) conn_open(c);
            return;
        }
        size_t off = 0;
        if (c->state == ST_WRITING || c->state == ST_HEADERS) {
            c->state = ST_HEADERS;
            size_t take = (size_t)r;
            if (c->hlen + take > sizeof c->hbuf - 1) take = sizeof c->hbuf - 1 - c->hlen;
            memcpy(c->hbuf + c->hlen, buf, take);
            size_t old = c->hlen;
            c->hlen += take;
            char *e = memmem(c->hbuf, c->hlen, "\r\n\r\n", 4);
            if (!e) {
                if (c->hlen >= sizeof c->hbuf - 1) { n_err_read++; conn_close(c); if (t < g_end) conn_open(c); return; }
                continue;
            }
            size_t hend = (size_t)(e - c->hbuf) + 4;
            parse_headers(c, hend);
            c->state = ST_BODY;
            off = hend - old;  /* body starts at this offset in buf */
            if (c->bstate == B_LEN && c->remaining == 0) { response_done(c, t); if (c->fd < 0) return; continue; }
        }
        if (c->state == ST_BODY && off < (size_t)r) {
            if (feed_body(c, buf + off, (size_t)r - off, t)) {
                response_done(c, t);
                if (c->fd < 0) return;
            }
        }
    }
}

static void on_writable(conn_t *c) {
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { n_err_conn++; conn_close(c); usleep(1000); if (now_s() < g_end) conn_open(c); return; }
        start_request(c);
    }
    if (c->state == ST_WRITING) {
        while (c->woff < g_reqlen) {
            ssize_t w = write(c->fd, g_req + c->woff, g_reqlen - c->woff);
            if (w < 0) {
                if (errno == EAGAIN) {
                    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
                    epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
                    return;
                }
                n_err_read++;
                conn_close(c);
                if (now_s() < g_end) conn_open(c);
                return;
            }
            c->woff += (size_t)w;
        }
        c->state = ST_HEADERS;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen -c CONNS -d SECONDS [-w WARMUP] [-m METHOD] [-b BODYFILE] [-H 'K: V']... [-S] [-T TIMEOUT] URL\n");
    exit(2);
}

int main(int argc, char **argv) {
    int conns = 16;
    double dur = 10, warm = 1;
    const char *method = "GET", *bodyfile = NULL;
    char *hdrs[64];
    int nh = 0, opt;
    while ((opt = getopt(argc, argv, "c:d:w:m:b:H:ST:")) != -1) {
        switch (opt) {
        case 'c': conns = atoi(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'w': warm = atof(optarg); break;
        case 'm': method = optarg; break;
        case 'b': bodyfile = optarg; method = strcmp(method, "GET") ? method : "POST"; break;
        case 'H': if (nh < 64) hdrs[nh++] = optarg; break;
        case 'S': g_sse = 1; break;
        case 'T': g_timeout = atof(optarg); break;
        default: usage();
        }
    }
    if (optind >= argc) usage();
    const char *url = argv[optind];
    if (strncmp(url, "http://", 7)) { fprintf(stderr, "only http:// URLs\n"); return 2; }
    char hostport[256], host[256], port[16] = "80";
    const char *pathp = strchr(url + 7, '/');
    size_t hpl = pathp ? (size_t)(pathp - (url + 7)) : strlen(url + 7);
    if (hpl >= sizeof hostport) return 2;
    memcpy(hostport, url + 7, hpl);
    hostport[hpl] = 0;
    if (!pathp) pathp = "/";
    strcpy(host, hostport);
    char *colon = strrchr(host, ':');
    if (colon && !strchr(host, ']')) { *colon = 0; snprintf(port, sizeof port, "%s", colon + 1); }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai)) { fprintf(stderr, "cannot resolve %s\n", host); return 2; }
    memcpy(&g_addr, ai->ai_addr, ai->ai_addrlen);
    g_addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);

    char *body = NULL;
    long blen = 0;
    if (bodyfile) {
        FILE *f = fopen(bodyfile, "rb");
        if (!f) { perror(bodyfile); return 2; }
        fseek(f, 0, SEEK_END); blen = ftell(f); fseek(f, 0, SEEK_SET);
        body = malloc(blen + 1);
        if (fread(body, 1, blen, f) != (size_t)blen) { perror("read"); return 2; }
        fclose(f);
    }
    size_t cap = 4096 + blen;
    for (int i = 0; i < nh; i++) cap += strlen(hdrs[i]) + 2;
    g_req = malloc(cap);
    int n = snprintf(g_req, cap, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench-loadgen\r\nAccept: */*\r\n", method, pathp, hostport);
    int have_ct = 0;
    for (int i = 0; i < nh; i++) {
        if (!strncasecmp(hdrs[i], "content-type:", 13)) have_ct = 1;
        n += snprintf(g_req + n, cap - n, "%s\r\n", hdrs[i]);
    }
    if (body) {
        if (!have_ct) n += snprintf(g_req + n, cap - n, "Content-Type: application/json\r\n");
        n += snprintf(g_req + n, cap - n, "Content-Length: %ld\r\n", blen);
    }
    n += snprintf(g_req + n, cap - n, "\r\n");
    if (body) { memcpy(g_req + n, body, blen); n += blen; }
    g_reqlen = n;

    g_epfd = epoll_create1(0);
    conn_t *cs = calloc(conns, sizeof(conn_t));
    double t0 = now_s();
    g_measure_start = t0 + warm;
    g_end = g_measure_start + dur;
    for (int i = 0; i < conns; i++) { cs[i].fd = -1; conn_open(&cs[i]); }
    struct epoll_event evs[1024];
    double last_timeout_check = t0;
    for (;;) {
        double t = now_s();
        if (t >= g_end) break;
        int ms = (int)((g_end - t) * 1000) + 1;
        if (ms > 50) ms = 50;
        int ne = epoll_wait(g_epfd, evs, 1024, ms);
        for (int i = 0; i < ne; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            if (evs[i].events & (EPOLLOUT)) on_writable(c);
            if (c->fd >= 0 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
        }
        t = now_s();
        if (t - last_timeout_check > 0.1) {
            last_timeout_check = t;
            for (int i = 0; i < conns; i++) {
                if (cs[i].fd >= 0 && t - cs[i].t_start > g_timeout) {
                    n_err_timeout++;
                    conn_close(&cs[i]);
                    conn_open(&cs[i]);
                } else if (cs[i].fd < 0 && t < g_end) {
                    conn_open(&cs[i]);
                }
            }
        }
    }
    double measured = now_s() - g_measure_start;
    int inflight = 0;
    for (int i = 0; i < conns; i++) { if (cs[i].fd >= 0) { inflight++; conn_close(&cs[i]); } }
    qsort(lat_total, nlat, sizeof(double), cmpd);
    qsort(lat_ttfb, nttfb, sizeof(double), cmpd);
    double st = 0, sf = 0;
    for (size_t i = 0; i < nlat; i++) st += lat_total[i];
    for (size_t i = 0; i < nttfb; i++) sf += lat_ttfb[i];
    printf("{\"tool\":\"loadgen\",\"connections\":%d,\"duration_s\":%.3f,\"requests\":%ld,\"rps\":%.2f,"
           "\"errors\":{\"connect\":%ld,\"read\":%ld,\"timeout\":%ld,\"non2xx\":%ld,\"bad_sse\":%ld},"
           "\"warmup_requests\":%ld,\"inflight_at_end\":%d,\"connects\":%lld,"
           "\"events_per_response\":%.2f,\"body_bytes_per_response\":%.1f,"
           "\"events_in_window\":%lld,\"events_per_s\":%.1f,\"events_total\":%lld,\"body_bytes_per_s\":%.1f,"
           "\"ttfb_samples\":%zu,\"ttfb_ms\":{\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
           "\"total_ms\":{\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f}}\n",
           conns, measured, n_ok, n_ok / measured,
           n_err_conn, n_err_read, n_err_timeout, n_non2xx, n_bad_sse, n_warm, inflight, n_connects,
           nlat ? (double)tot_events / nlat : 0, nlat ? (double)tot_bytes / nlat : 0,
           ev_window, ev_window / measured, ev_all, bytes_window / measured,
           nttfb, nttfb ? sf / nttfb * 1e3 : 0, pct(lat_ttfb, nttfb, 50) * 1e3, pct(lat_ttfb, nttfb, 90) * 1e3,
           pct(lat_ttfb, nttfb, 99) * 1e3, nttfb ? lat_ttfb[nttfb - 1] * 1e3 : 0,
           nlat ? st / nlat * 1e3 : 0, pct(lat_total, nlat, 50) * 1e3, pct(lat_total, nlat, 90) * 1e3,
           pct(lat_total, nlat, 99) * 1e3, nlat ? lat_total[nlat - 1] * 1e3 : 0);
    return 0;
}
