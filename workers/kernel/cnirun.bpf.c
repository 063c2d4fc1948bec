// CNI plugin runs, as the kernel sees them. Loaded by ebpf.py with BCC.
//
// Tracepoints only, and only their arguments (the tracepoint format files),
// never kernel struct offsets: the headers BCC compiles against may belong
// to a different kernel. User-space layouts read here (envp, user_msghdr,
// iovec, clone_args.flags) are stable UAPI.
//
// Plugin process trees live in `tracked` (task id -> run): an exec of a
// binary directly in a configured bin dir starts a run, forks inherit it.
// Hot syscall probes (read, write, sendto, sendmsg, close) look `tracked`
// up first and return at once for every other task.
//
// Build-time switches (cflags from ebpf.py): HAVE_<tracepoint> for
// optional attach points, HAVE_GROUP_DEAD. The event types (EV_*), flags
// (F_*), VIA_*, PATH_MAX_, MAX_BIN_DIRS and RINGBUF_PAGES are defined once,
// in ebpf.py, and passed as -D flags.

#ifndef EV_NETNS_ENTER
#error "build with the -D constants of ebpf.py"
#endif

#define DATA_MAX 4096       // bytes of payload per event (one stdin/stdout/netlink chunk)
#define ENV_MAX_VARS 256    // envp entries scanned for CNI_* (runtimes append them last)
#define ENV_STR_MAX 1024    // bytes kept of one CNI_* variable
#define STREAM_CAP 65536    // bytes captured per run per stream; more is flagged truncated

#define AF_NETLINK_ 16
#define NETLINK_ROUTE_ 0
#define CLONE_NEWNET_ 0x40000000ULL

// Event types:
//   EV_ENV          CNI_* variables at execve of a plugin binary (tid = the exec'ing task)
//   EV_EXEC         the plugin exec succeeded: a run starts; data = filename
//   EV_EXIT         the run's root process is gone; code = exit_group status
//   EV_STDIN        data read from fd 0 by the root; len 0 = EOF
//   EV_STDOUT       data written to fd 1 by the root
//   EV_STDERR       data written to fd 2 by the root
//   EV_NETLINK      an NETLINK_ROUTE request sent by a tracked task
//   EV_NETNS_NEW    unshare/clone with CLONE_NEWNET succeeded; aux = child pid (clone)
//   EV_NETNS_ENTER  setns into a net namespace succeeded; aux = the fd
// Flags:
//   F_TRUNCATED     this chunk was cut to DATA_MAX, or the stream passed STREAM_CAP
//   F_HAVE_CODE     EV_EXIT: code is the exit_group status
//   F_LOST          EV_EXIT: some events of this run could not be queued
//   F_MULTI_IOV     EV_NETLINK: only the first iovec was captured

struct event {
    u32 type;
    u32 pid;        // tgid of the task
    u32 tid;        // task id (EV_ENV/EV_EXEC: the task that called execve)
    u32 ppid;       // EV_EXEC: tgid that forked the plugin process
    u64 ts;         // boot-time ns
    u64 run;        // run key (boot-time ns of its exec), 0 = none
    u64 parent_run; // EV_EXEC: the run of the task that exec'd the plugin
    u32 parent_pid; // EV_EXEC: root pid of parent_run
    s32 code;
    u32 flags;
    u32 aux;
    u32 len;        // bytes of data
    char comm[16];
    u8 data[DATA_MAX];
};

struct task_info {
    u64 run;
    u32 root;   // tgid of the run's plugin process
    u32 pad;
};

struct run_state {
    u32 stdin_bytes;
    u32 stdout_bytes;
    u32 stderr_bytes;
    u32 flags;
    s32 code;
    u32 pad;
};

struct dir_key {
    char path[PATH_MAX_];
};

struct sock_key {
    u32 tgid;
    u32 fd;
};

struct ns_pending {
    u32 kind;   // EV_NETNS_NEW or EV_NETNS_ENTER
    u32 fd;     // setns: the namespace fd
    u32 via;    // EV_NETNS_NEW: VIA_UNSHARE or VIA_CLONE
    u32 pad;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(scratch, struct event, 1);
BPF_PERCPU_ARRAY(lost, u64, 2);                        // [0] events, [1] of them EV_EXEC: whole runs
BPF_HASH(bin_dirs, struct dir_key, u8, MAX_BIN_DIRS);
BPF_HASH(tracked, u32, struct task_info, 16384);
BPF_HASH(runs, u64, struct run_state, 4096);
BPF_TABLE("lru_hash", u32, u32, parents, 32768);      // task -> tgid that forked it
BPF_TABLE("lru_hash", u32, u8, pending_exec, 1024);   // tid in execve of a plugin binary
// LRU: a task that dies inside a syscall, or a plugin that exits without
// closing its netlink socket (the usual case), leaves an entry behind.
BPF_TABLE("lru_hash", u32, u64, reads, 1024);                   // tid -> stdin buffer of a read in flight
BPF_TABLE("lru_hash", u32, u8, nl_pending, 1024);               // tid in socket(AF_NETLINK, NETLINK_ROUTE)
BPF_TABLE("lru_hash", struct sock_key, u64, nlsocks, 4096);     // -> the run that opened it
BPF_TABLE("lru_hash", u32, struct ns_pending, ns_calls, 1024);

static __always_inline struct event *new_event(u32 type, u64 run) {
    int zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->ppid = 0;
    e->ts = bpf_ktime_get_boot_ns();
    e->run = run;
    e->parent_run = 0;
    e->parent_pid = 0;
    e->code = 0;
    e->flags = 0;
    e->aux = 0;
    e->len = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void mark_lost(u32 type, u64 run) {
    int zero = 0, one = 1;
    u64 *n = lost.lookup(&zero);
    if (n)
        (*n)++;
    if (type == EV_EXEC) {
        n = lost.lookup(&one);
        if (n)
            (*n)++;
    }
    if (run) {
        struct run_state *rs = runs.lookup(&run);
        if (rs)
            rs->flags |= F_LOST;
    }
}

static __always_inline int submit(struct event *e) {
    u32 len = e->len;
    if (len > DATA_MAX)
        len = DATA_MAX;
    u64 size = sizeof(*e) - DATA_MAX + len;
    if (size > sizeof(*e))
        size = sizeof(*e);
    if (events.ringbuf_output(e, size, 0) != 0) {
        mark_lost(e->type, e->run);
        return -1;
    }
    return 0;
}

static __always_inline struct task_info *current_task_info(void) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    return tracked.lookup(&tid);
}

#include "bin_dir.h"

// execve(2) of a plugin binary: remember the task, send its CNI_* variables.
static __always_inline int on_execve(const char *filename, const char *const *envp) {
    struct event *e = new_event(EV_ENV, 0);
    if (!e)
        return 0;
    if (bpf_probe_read_user_str(e->data, PATH_MAX_, filename) <= 0 || e->data[0] != '/')
        return 0;
    if (!bin_dir_key(e) || !bin_dirs.lookup((struct dir_key *)e->data))
        return 0;
    e->aux = 0;
    u32 tid = e->tid;
    // Each CNI_* variable is stored NUL-terminated, one after the other; the
    // offset is kept in e->len (map memory) for the same reason as above.
    for (int i = 0; i < ENV_MAX_VARS; i++) {
        const char *p = 0;
        if (bpf_probe_read_user(&p, sizeof(p), &envp[i]) != 0 || !p)
            break;
        char head[4] = {};
        if (bpf_probe_read_user(head, sizeof(head), p) != 0)
            continue;
        if (head[0] != 'C' || head[1] != 'N' || head[2] != 'I' || head[3] != '_')
            continue;
        u32 off = e->len;
        if (off > DATA_MAX - ENV_STR_MAX) {
            e->flags |= F_TRUNCATED;
            break;
        }
        int n = bpf_probe_read_user_str(&e->data[off], ENV_STR_MAX, p);
        if (n <= 0)
            continue;
        if (n == ENV_STR_MAX)
            e->flags |= F_TRUNCATED;
        e->len = off + n;
    }
    // bit 0: a plugin exec is pending; bit 1: its CNI_* block was lost.
    u8 pending = submit(e) == 0 ? 1 : 3;
    pending_exec.update(&tid, &pending);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    return on_execve(args->filename, args->envp);
}

#ifdef HAVE_sys_enter_execveat
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) {
    return on_execve(args->filename, args->envp);
}
#endif

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent_tgid = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->child_pid;
    parents.update(&child, &parent_tgid);
    u32 ptid = args->parent_pid;
    struct task_info *ti = tracked.lookup(&ptid);
    if (ti) {
        struct task_info copy = *ti;
        tracked.update(&child, &copy);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 old = args->old_pid;
    u8 *pending = pending_exec.lookup(&old);
    if (!pending)
        return 0;  // not a plugin binary; a tracked task keeps its run
    u8 env_lost = *pending & 2;
    pending_exec.delete(&old);
    u32 pid = args->pid;
    struct task_info *self = tracked.lookup(&old);
    if (self && self->root == pid)
        return 0;  // a run's own process exec'ing a plugin (a wrapper script): still the same run
    u64 run = bpf_ktime_get_boot_ns();
    struct event *e = new_event(EV_EXEC, run);
    if (!e)
        return 0;
    e->tid = old;
    e->ts = run;
    if (env_lost)
        e->flags |= F_TRUNCATED;  // EV_EXEC: the CNI_* block was not captured
    struct task_info *caller = tracked.lookup(&old);
    if (caller) {
        e->parent_run = caller->run;
        e->parent_pid = caller->root;
    }
    u32 *pp = parents.lookup(&pid);
    if (pp)
        e->ppid = *pp;
    struct task_info ti = {.run = run, .root = pid};
    tracked.update(&pid, &ti);
    if (old != pid)
        tracked.delete(&old);
    struct run_state rs = {};
    runs.update(&run, &rs);
    unsigned short loc = args->data_loc_filename & 0xFFFF;
    int n = bpf_probe_read_kernel_str(e->data, PATH_MAX_, (char *)args + loc);
    e->len = n > 0 ? n - 1 : 0;
    submit(e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    struct task_info *ti = current_task_info();
    if (!ti || ti->root != (bpf_get_current_pid_tgid() >> 32))
        return 0;
    u64 run = ti->run;
    struct run_state *rs = runs.lookup(&run);
    if (rs) {
        rs->code = (s32)args->error_code;
        rs->flags |= F_HAVE_CODE;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u32 tid = args->pid;
    struct task_info *ti = tracked.lookup(&tid);
    if (!ti)
        return 0;
    struct task_info t = *ti;
    tracked.delete(&tid);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead || tgid != t.root)
        return 0;
#else
    if (tid != t.root)
        return 0;
#endif
    u64 run = t.run;
    struct event *e = new_event(EV_EXIT, run);
    if (!e)
        return 0;
    struct run_state *rs = runs.lookup(&run);
    if (rs) {
        e->code = rs->code;
        e->flags = rs->flags & (F_HAVE_CODE | F_LOST);
        if (rs->stdout_bytes >= STREAM_CAP || rs->stdin_bytes >= STREAM_CAP)
            e->flags |= F_TRUNCATED;
        runs.delete(&run);
    }
    submit(e);
    return 0;
}

// -- stdin / stdout / stderr of a run's root process -------------------------------

static __always_inline int capture_stream(u32 type, struct task_info *ti, const void *buf, u64 count) {
    u64 run = ti->run;
    struct run_state *rs = runs.lookup(&run);
    if (!rs)
        return 0;
    u32 *seen = type == EV_STDIN ? &rs->stdin_bytes : type == EV_STDOUT ? &rs->stdout_bytes : &rs->stderr_bytes;
    if (*seen >= STREAM_CAP)
        return 0;
    struct event *e = new_event(type, run);
    if (!e)
        return 0;
    u64 len = count;  // unsigned all the way, so the verifier sees 0..DATA_MAX
    if (len > DATA_MAX) {
        len = DATA_MAX;
        e->flags |= F_TRUNCATED;
    }
    if (len > 0 && bpf_probe_read_user(e->data, len, buf) != 0)
        return 0;
    *seen += len;
    if (*seen >= STREAM_CAP)
        e->flags |= F_TRUNCATED;
    e->len = len;
    submit(e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) {
    struct task_info *ti = current_task_info();
    if (!ti || args->fd != 0)
        return 0;
    if (ti->root != (bpf_get_current_pid_tgid() >> 32))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 buf = (u64)args->buf;
    reads.update(&tid, &buf);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read) {
    struct task_info *ti = current_task_info();
    if (!ti)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *buf = reads.lookup(&tid);
    if (!buf)
        return 0;
    const void *p = (const void *)*buf;
    reads.delete(&tid);
    if (args->ret < 0)
        return 0;
    return capture_stream(EV_STDIN, ti, p, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) {
    struct task_info *ti = current_task_info();
    if (!ti || args->fd < 1 || args->fd > 2)
        return 0;
    if (ti->root != (bpf_get_current_pid_tgid() >> 32))
        return 0;
    return capture_stream(args->fd == 1 ? EV_STDOUT : EV_STDERR, ti, args->buf, args->count);
}

// -- netlink requests of tracked tasks ---------------------------------------------

#ifdef HAVE_sys_enter_socket
TRACEPOINT_PROBE(syscalls, sys_enter_socket) {
    if (args->family != AF_NETLINK_ || args->protocol != NETLINK_ROUTE_)
        return 0;
    if (!current_task_info())
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u8 one = 1;
    nl_pending.update(&tid, &one);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!nl_pending.lookup(&tid))
        return 0;
    nl_pending.delete(&tid);
    struct task_info *ti = current_task_info();
    if (args->ret < 0 || !ti)
        return 0;
    struct sock_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = (u32)args->ret};
    u64 run = ti->run;
    nlsocks.update(&k, &run);
    return 0;
}
#endif

#ifdef HAVE_sys_enter_close
TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    if (!current_task_info())
        return 0;
    struct sock_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = (u32)args->fd};
    nlsocks.delete(&k);
    return 0;
}
#endif

static __always_inline int capture_netlink(struct task_info *ti, u32 fd, const void *buf, u64 len, u32 flags) {
    struct sock_key k = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd};
    u64 *opened_by = nlsocks.lookup(&k);
    if (!opened_by || *opened_by != ti->run)
        return 0;  // not netlink, or a stale entry of an earlier process with this pid
    struct event *e = new_event(EV_NETLINK, ti->run);
    if (!e)
        return 0;
    u64 n = len;
    e->flags = flags;
    if (n > DATA_MAX) {
        n = DATA_MAX;
        e->flags |= F_TRUNCATED;
    }
    if (n > 0 && bpf_probe_read_user(e->data, n, buf) != 0)
        return 0;
    e->len = n;
    e->aux = fd;
    submit(e);
    return 0;
}

#ifdef HAVE_sys_enter_sendto
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) {
    struct task_info *ti = current_task_info();
    if (!ti)
        return 0;
    return capture_netlink(ti, args->fd, args->buff, args->len, 0);
}
#endif

struct msghdr_u {   // struct user_msghdr (UAPI)
    void *name;
    int namelen;
    void *iov;
    u64 iovlen;
};

struct iovec_u {    // struct iovec (UAPI)
    void *base;
    u64 len;
};

#ifdef HAVE_sys_enter_sendmsg
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    struct task_info *ti = current_task_info();
    if (!ti)
        return 0;
    struct msghdr_u m = {};
    struct iovec_u v = {};
    if (bpf_probe_read_user(&m, sizeof(m), args->msg) != 0 || m.iovlen == 0)
        return 0;
    if (bpf_probe_read_user(&v, sizeof(v), m.iov) != 0)
        return 0;
    return capture_netlink(ti, args->fd, v.base, v.len, m.iovlen > 1 ? F_MULTI_IOV : 0);
}
#endif

// -- network namespaces: from any task (rare calls, filtered on flags) -------------

static __always_inline void ns_enter(u32 kind, u32 fd, u32 via) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ns_pending p = {.kind = kind, .fd = fd, .via = via};
    ns_calls.update(&tid, &p);
}

static __always_inline int ns_exit(s64 ret) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct ns_pending *p = ns_calls.lookup(&tid);
    if (!p)
        return 0;
    struct ns_pending c = *p;
    ns_calls.delete(&tid);
    // Failed; a clone's return in the child is 0 and never reaches here (other tid).
    if (ret < 0 || (c.via == VIA_CLONE && ret == 0))
        return 0;
    struct task_info *ti = current_task_info();
    struct event *e = new_event(c.kind, ti ? ti->run : 0);
    if (!e)
        return 0;
    e->aux = c.kind == EV_NETNS_ENTER ? c.fd : (u32)ret;  // setns: the fd; clone: the child
    e->code = c.via;
    submit(e);
    return 0;
}

#ifdef HAVE_sys_enter_unshare
TRACEPOINT_PROBE(syscalls, sys_enter_unshare) {
    if (args->unshare_flags & CLONE_NEWNET_)
        ns_enter(EV_NETNS_NEW, 0, VIA_UNSHARE);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_unshare) {
    return ns_exit(args->ret);
}
#endif

#ifdef HAVE_sys_enter_setns
TRACEPOINT_PROBE(syscalls, sys_enter_setns) {
    // nstype 0 means "any": only worth a look from a plugin process.
    if ((args->flags & CLONE_NEWNET_) || (args->flags == 0 && current_task_info()))
        ns_enter(EV_NETNS_ENTER, args->fd, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_setns) {
    return ns_exit(args->ret);
}
#endif

#ifdef HAVE_sys_enter_clone
TRACEPOINT_PROBE(syscalls, sys_enter_clone) {
    if (args->clone_flags & CLONE_NEWNET_)
        ns_enter(EV_NETNS_NEW, 0, VIA_CLONE);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_clone) {
    return ns_exit(args->ret);
}
#endif

#ifdef HAVE_sys_enter_clone3
TRACEPOINT_PROBE(syscalls, sys_enter_clone3) {
    u64 flags = 0;  // clone_args.flags is the first member (UAPI)
    if (bpf_probe_read_user(&flags, sizeof(flags), args->uargs) != 0)
        return 0;
    if (flags & CLONE_NEWNET_)
        ns_enter(EV_NETNS_NEW, 0, VIA_CLONE);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_clone3) {
    return ns_exit(args->ret);
}
#endif
