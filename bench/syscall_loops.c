// Per-call cost of unrelated syscall loops, for the kernel monitor's tax on
// the node's other processes. Each loop is timed by its own thread CPU time
// (CLOCK_THREAD_CPUTIME_ID): time spent descheduled does not count.
//
//   syscall_loops SCALE   ->   read_ns=<x> getpid_ns=<y> sendto_ns=<z> fork_ns=<w>
//
// read:   read(fd, buf, 64) from /dev/zero
// getpid: syscall(SYS_getpid) (no libc caching)
// sendto: a 32-byte UDP datagram to a bound, never-read socket on 127.0.0.1
//         (once its receive buffer is full every datagram is dropped: a
//         steady, repeatable path)
// fork:   fork + _exit + waitpid, wall time per iteration (the child's CPU is
//         not this thread's): the path the lean capture's sched tracepoints are on
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double thread_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double loop_read(long n) {
    int fd = open("/dev/zero", O_RDONLY);
    char buf[64];
    for (int i = 0; i < 1000; i++)
        (void)!read(fd, buf, sizeof buf);
    double t0 = thread_ns();
    for (long i = 0; i < n; i++)
        (void)!read(fd, buf, sizeof buf);
    double t = thread_ns() - t0;
    close(fd);
    return t / n;
}

static double loop_getpid(long n) {
    for (int i = 0; i < 1000; i++)
        syscall(SYS_getpid);
    double t0 = thread_ns();
    for (long i = 0; i < n; i++)
        syscall(SYS_getpid);
    return (thread_ns() - t0) / n;
}

static double loop_sendto(long n) {
    int rx = socket(AF_INET, SOCK_DGRAM, 0);
    int tx = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    int small = 4096;
    setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    if (bind(rx, (struct sockaddr *)&a, sizeof a) || getsockname(rx, (struct sockaddr *)&a, &alen)) {
        perror("bind");
        exit(1);
    }
    char msg[32] = "cnisup-bench";
    for (int i = 0; i < 10000; i++)  // warm-up; fills the receive buffer
        sendto(tx, msg, sizeof msg, 0, (struct sockaddr *)&a, sizeof a);
    double t0 = thread_ns();
    for (long i = 0; i < n; i++)
        sendto(tx, msg, sizeof msg, 0, (struct sockaddr *)&a, sizeof a);
    double t = thread_ns() - t0;
    close(rx);
    close(tx);
    return t / n;
}

static double loop_fork(long n) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        waitpid(p, 0, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
}

int main(int argc, char **argv) {
    double scale = argc > 1 ? atof(argv[1]) : 1.0;
    double r = loop_read((long)(1000000 * scale));
    double g = loop_getpid((long)(1000000 * scale));
    double s = loop_sendto((long)(300000 * scale));
    double f = loop_fork((long)(1000 * scale));
    printf("read_ns=%.1f getpid_ns=%.1f sendto_ns=%.1f fork_ns=%.1f\n", r, g, s, f);
    return 0;
}
