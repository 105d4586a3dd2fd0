/*
 * Paced (open-loop) TCP frame sender in C: the same job and the same parent protocol as
 * bench/tcp_paced.py (read its docstring), at about a tenth of the CPU per frame, so that at
 * 50% of the gateway's max rate on a 2-core box the load generator does not take the core the
 * gateway needs (the Python senders cost ~25 us per frame: 0.6 of a core at 23k frames/s).
 *
 * bench/tcp_paced.py compiles it on first use (gcc -O2) and starts it with the same arguments
 * as its Python senders. Frames (protocols/FRAMES.md): a 4-byte big-endian length, then magic
 * 0xA1, type, flags, an 8-byte big-endian seq, then the body (CBOR).
 *
 * Per device: HELLO {device_id, secret, client}, wait for HELLO_OK; then DATA frames at fixed
 * times t0 + (i / total + k) * interval (i: the device's index in the fleet), skipping a slot
 * when `window` frames are unacked; ACK -> latency of that seq (frames sent in the measured
 * window); PING -> PONG; PUSH -> ACK; ERROR / CLOSE -> an error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0xA1
#define T_HELLO 0x01
#define T_HELLO_OK 0x02
#define T_DATA 0x10
#define T_ACK 0x11
#define T_PUSH 0x12
#define T_PING 0x20
#define T_PONG 0x21
#define T_ERROR 0x30
#define T_CLOSE 0x31
#define RING 256 /* > any window */
#define INBUF 65536 + 16

typedef struct {
    int fd;
    int hello_ok;
    int closed;
    uint64_t next_seq;
    int unacked;
    double sent_at[RING];
    uint64_t slot_seq[RING]; /* the unacked seq in each slot, 0 when free */
    unsigned char in[INBUF];
    size_t in_len;
    unsigned char *out; /* bytes a full socket buffer did not take */
    size_t out_len, out_cap;
} Device;

static Device *devices;
static int n_devices, window_size, epoll_fd;
static double measure_from, measure_to;
static uint32_t *latencies;
static size_t n_latencies, cap_latencies;
static long error_count;
static char first_errors[5][160];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* = Python's time.monotonic() on Linux */
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void add_error(const char *text) {
    if (error_count < 5) snprintf(first_errors[error_count], sizeof first_errors[0], "%s", text);
    error_count++;
}

static void put_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v;
}

static uint64_t get_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* A CBOR head (major type, argument) at p; returns its length. */
static size_t cbor_head(unsigned char *p, int major, uint64_t n) {
    if (n < 24) { p[0] = (unsigned char)(major << 5 | n); return 1; }
    if (n < 256) { p[0] = (unsigned char)(major << 5 | 24); p[1] = (unsigned char)n; return 2; }
    p[0] = (unsigned char)(major << 5 | 25); put_be(p + 1, n, 2); return 3;
}

static size_t cbor_text(unsigned char *p, const char *s) {
    size_t n = strlen(s), h = cbor_head(p, 3, n);
    memcpy(p + h, s, n);
    return h + n;
}

static size_t frame_header(unsigned char *p, int type, uint64_t seq, size_t body_len) {
    put_be(p, 11 + body_len, 4);
    p[4] = MAGIC; p[5] = (unsigned char)type; p[6] = 0;
    put_be(p + 7, seq, 8);
    return 15;
}

static void dev_write(Device *d, const unsigned char *buf, size_t len) {
    if (d->closed) return;
    if (d->out_len == 0) {
        ssize_t n = write(d->fd, buf, len);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN) { add_error("write failed"); d->closed = 1; return; }
            n = 0;
        }
        buf += n; len -= (size_t)n;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(d - devices)};
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, d->fd, &ev);
    }
    if (d->out_len + len > d->out_cap) {
        d->out_cap = (d->out_len + len) * 2;
        d->out = realloc(d->out, d->out_cap);
    }
    memcpy(d->out + d->out_len, buf, len);
    d->out_len += len;
}

static void dev_flush(Device *d) {
    ssize_t n = write(d->fd, d->out, d->out_len);
    if (n < 0) { if (errno != EAGAIN) { add_error("write failed"); d->closed = 1; } return; }
    memmove(d->out, d->out + n, d->out_len - (size_t)n);
    d->out_len -= (size_t)n;
    if (d->out_len == 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(d - devices)};
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, d->fd, &ev);
    }
}

static void send_control(Device *d, int type, uint64_t seq) {
    unsigned char buf[15];
    frame_header(buf, type, seq, 0);
    dev_write(d, buf, sizeof buf);
}

static unsigned char data_frame[15 + 3 + 65536];
static size_t data_body_len;

static int dev_send_data(Device *d) {
    if (d->unacked >= window_size || d->closed) return 0;
    uint64_t seq = d->next_seq++;
    d->sent_at[seq % RING] = now_s();
    d->slot_seq[seq % RING] = seq;
    d->unacked++;
    put_be(data_frame + 7, seq, 8);
    dev_write(d, data_frame, 15 + data_body_len);
    return 1;
}

static void on_frame(Device *d, const unsigned char *f, size_t len, double now) {
    int type = f[5];
    uint64_t seq = get_be(f + 7, 8);
    if (f[4] != MAGIC) { add_error("bad magic from the gateway"); d->closed = 1; return; }
    switch (type) {
    case T_ACK:
        if (seq != 0 && d->slot_seq[seq % RING] == seq) {
            d->slot_seq[seq % RING] = 0;
            double sent = d->sent_at[seq % RING];
            if (sent >= measure_from && sent < measure_to) {
                if (n_latencies == cap_latencies) {
                    cap_latencies = cap_latencies ? cap_latencies * 2 : 65536;
                    latencies = realloc(latencies, cap_latencies * sizeof *latencies);
                }
                latencies[n_latencies++] = (uint32_t)((now - sent) * 1e6 + 0.5);
            }
            d->unacked--;
        }
        break;
    case T_HELLO_OK: d->hello_ok = 1; break;
    case T_PUSH: send_control(d, T_ACK, seq); break;
    case T_PING: send_control(d, T_PONG, seq); break;
    case T_ERROR: case T_CLOSE: {
        char text[160];
        snprintf(text, sizeof text, "%s frame (%zu bytes) on device %ld",
                 type == T_ERROR ? "ERROR" : "CLOSE", len, (long)(d - devices));
        add_error(text);
        if (!d->hello_ok) d->closed = 1;
        break;
    }
    default: break;
    }
}

static void dev_read(Device *d) {
    for (;;) {
        ssize_t n = read(d->fd, d->in + d->in_len, sizeof d->in - d->in_len);
        if (n == 0) { if (!d->closed) add_error("connection closed by the gateway"); d->closed = 1; return; }
        if (n < 0) {
            if (errno == EAGAIN) return;
            add_error("read failed"); d->closed = 1; return;
        }
        d->in_len += (size_t)n;
        double now = now_s();
        size_t at = 0;
        while (d->in_len - at >= 15) {
            size_t len = 4 + get_be(d->in + at, 4);
            if (len > sizeof d->in) { add_error("oversized frame from the gateway"); d->closed = 1; return; }
            if (d->in_len - at < len) break;
            on_frame(d, d->in + at, len, now);
            at += len;
        }
        memmove(d->in, d->in + at, d->in_len - at);
        d->in_len -= at;
    }
}

static int timer_fd = -1;

/* Wait up to `timeout_ms` for sockets (and the pacing timer), and serve what is ready. */
static void handle_events(int timeout_ms) {
    struct epoll_event events[256];
    int n = epoll_wait(epoll_fd, events, 256, timeout_ms);
    for (int i = 0; i < n; i++) {
        if (events[i].data.u32 == UINT32_MAX) { /* the timer */
            uint64_t expirations;
            if (read(timer_fd, &expirations, sizeof expirations) < 0) {}
            continue;
        }
        Device *d = &devices[events[i].data.u32];
        if (events[i].events & EPOLLOUT) dev_flush(d);
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) dev_read(d);
    }
}

/* Arm the timer: at `at` (CLOCK_MONOTONIC seconds) if absolute, else `at` seconds from now. */
static void wake_at(double at, int absolute) {
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)at;
    its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timerfd_settime(timer_fd, absolute ? TFD_TIMER_ABSTIME : 0, &its, NULL);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *result_file = NULL;
    int port = 0, first_device = -1, stride = 0, total = 0, payload_bytes = 64;
    double rate = 0;
    uint64_t first_seq = 0;
    window_size = 8;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) host = v;
        else if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--first-device")) first_device = atoi(v);
        else if (!strcmp(k, "--stride")) stride = atoi(v);
        else if (!strcmp(k, "--total-devices")) total = atoi(v);
        else if (!strcmp(k, "--rate")) rate = atof(v);
        else if (!strcmp(k, "--first-seq")) first_seq = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--window")) window_size = atoi(v);
        else if (!strcmp(k, "--payload-bytes")) payload_bytes = atoi(v);
        else if (!strcmp(k, "--result-file")) result_file = v;
        else { fprintf(stderr, "unknown option %s\n", k); return 2; }
    }
    if (!port || first_device < 0 || stride < 1 || total < 1 || rate <= 0 || !first_seq ||
        !result_file || window_size < 1 || window_size >= RING || payload_bytes > 65535) {
        fprintf(stderr, "usage: see bench/tcp_paced.py (same arguments)\n");
        return 2;
    }
    n_devices = (total - first_device + stride - 1) / stride;
    devices = calloc((size_t)n_devices, sizeof *devices);
    epoll_fd = epoll_create1(0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    for (int k = 0; k < n_devices; k++) {
        Device *d = &devices[k];
        int index = first_device + k * stride;
        d->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(d->fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 1; }
        int one = 1;
        setsockopt(d->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        unsigned char hello[512], *body = hello + 15;
        char id[32], secret[32];
        snprintf(id, sizeof id, "bench-%05d", index);
        snprintf(secret, sizeof secret, "secret-%05d", index);
        size_t b = cbor_head(body, 5, 3);
        b += cbor_text(body + b, "device_id"); b += cbor_text(body + b, id);
        b += cbor_text(body + b, "secret"); b += cbor_text(body + b, secret);
        b += cbor_text(body + b, "client"); b += cbor_text(body + b, "bench/tcp_paced_sender");
        frame_header(hello, T_HELLO, 0, b);
        if (write(d->fd, hello, 15 + b) != (ssize_t)(15 + b)) { perror("hello"); return 1; }
        d->next_seq = first_seq;
        fcntl(d->fd, F_SETFL, fcntl(d->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)k};
        epoll_ctl(epoll_fd, EPOLL_CTL_ADD, d->fd, &ev);
    }
    double hello_deadline = now_s() + 60;
    for (;;) {
        int ready = 0, closed = 0;
        for (int k = 0; k < n_devices; k++) { ready += devices[k].hello_ok; closed += devices[k].closed; }
        if (closed) { fprintf(stderr, "%s\n", first_errors[0]); return 1; }
        if (ready == n_devices) break;
        if (now_s() > hello_deadline) { fprintf(stderr, "no HELLO_OK within 60 s\n"); return 1; }
        handle_events(50);
    }
    printf("READY\n");
    fflush(stdout);
    double t0, warmup, duration;
    if (scanf(" GO %lf %lf %lf", &t0, &warmup, &duration) != 3) { fprintf(stderr, "no GO line\n"); return 1; }

    size_t h = cbor_head(data_frame + 15, 2, (uint64_t)payload_bytes);
    for (int i = 0; i < payload_bytes; i++) data_frame[15 + h + i] = (unsigned char)rand();
    data_body_len = h + (size_t)payload_bytes;
    frame_header(data_frame, T_DATA, 0, data_body_len);

    timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epoll_fd, EPOLL_CTL_ADD, timer_fd, &tev);
    double interval = total / rate;
    double *offsets = malloc((size_t)n_devices * sizeof *offsets);
    for (int k = 0; k < n_devices; k++) offsets[k] = (double)(first_device + k * stride) / total * interval;
    measure_from = t0 + warmup;
    measure_to = t0 + warmup + duration;
    long sent = 0, skipped = 0, late = 0;
    int k = 0;
    double cycle_at = t0;
    for (;;) {
        double now = now_s();
        if (now >= measure_to) break;
        int counting = now >= measure_from;
        double at;
        while ((at = cycle_at + offsets[k]) <= now) {
            if (dev_send_data(&devices[k])) {
                sent += counting;
                late += counting && now - at > 0.001;
            } else {
                skipped += counting;
            }
            if (++k == n_devices) { k = 0; cycle_at += interval; }
        }
        wake_at(at < measure_to ? at : measure_to, 1);
        handle_events(1000);
    }
    /* Bring every device to the same next seq for the next pass, then wait for every ACK. */
    uint64_t top = first_seq + (uint64_t)((warmup + duration) / interval) + 2;
    double deadline = now_s() + 60;
    for (;;) {
        int busy = 0;
        for (int j = 0; j < n_devices; j++) {
            Device *d = &devices[j];
            if (d->closed) continue;
            while (d->next_seq < top && dev_send_data(d)) {}
            busy |= d->unacked > 0 || d->next_seq < top;
        }
        if (!busy || now_s() > deadline) break;
        wake_at(0.005, 0);
        handle_events(1000);
    }
    long unacked = 0;
    for (int j = 0; j < n_devices; j++) unacked += devices[j].unacked;
    if (unacked) {
        char text[160];
        snprintf(text, sizeof text, "%ld frames still unacked 60 s after the paced pass", unacked);
        add_error(text);
    }
    for (int j = 0; j < n_devices; j++) {
        Device *d = &devices[j];
        unsigned char close_frame[64], *body = close_frame + 15;
        size_t b = cbor_head(body, 5, 2);
        b += cbor_text(body + b, "code"); b += cbor_head(body + b, 0, 1000);
        b += cbor_text(body + b, "reason"); b += cbor_text(body + b, "bench done");
        frame_header(close_frame, T_CLOSE, 0, b);
        if (!d->closed && d->out_len == 0 && write(d->fd, close_frame, 15 + b) < 0) {}
        close(d->fd);
    }
    FILE *out = fopen(result_file, "w");
    if (!out) { perror(result_file); return 1; }
    fprintf(out, "{\"sent\": %ld, \"skipped_window_full\": %ld, \"sent_late\": %ld, "
                 "\"next_seq\": %llu, \"error_count\": %ld, \"errors\": [",
            sent, skipped, late, (unsigned long long)top, error_count);
    for (long e = 0; e < error_count && e < 5; e++) fprintf(out, "%s\"%s\"", e ? ", " : "", first_errors[e]);
    fprintf(out, "], \"latencies_us\": [");
    for (size_t i = 0; i < n_latencies; i++) fprintf(out, i ? ",%u" : "%u", latencies[i]);
    fprintf(out, "]}\n");
    fclose(out);
    printf("DONE\n");
    fflush(stdout);
    return 0;
}
