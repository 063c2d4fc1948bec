// CNI plugin runs with no syscall tracepoint in the steady state: the
// `kernel.capture: lean` program, loaded by lean.py with BCC.
//
// Always attached (each fires per exec, fork or task exit, never per syscall):
//   sched:sched_process_exec   a plugin run starts: filename, its parent, the
//                              env block of the new image (mm->env_start..end),
//                              the open files of fd 1 and 2
//   sched:sched_process_fork   children and threads of a run belong to it
//   sched:sched_process_exit   a run's process is gone: task->exit_code; any
//                              other task that dies in a netns other than its
//                              leader's (a thread that unshared) or its
//                              parent's: EV_NETNS_SEEN, once per netns
//   task:task_newtask          clone/clone3 with CLONE_NEWNET: the new netns
// Attached by lean.py only while a plugin run is alive (never by BCC itself):
//   syscalls:sys_enter_write   lean_write: a run's writes to the *open files*
//                              its stdout and stderr were at exec
//
// Kernel structs are read only at offsets from the running kernel's BTF
// (btf.py, passed as -DOFF_*): the headers BCC compiles against may belong
// to another kernel. No kernel struct type is dereferenced here; every read
// is RD(dst, base, OFF_*). The event types (EV_*), flags (F_*), PATH_MAX_,
// MAX_BIN_DIRS and RINGBUF_PAGES are defined once, in lean.py.

#if !defined(EV_NETNS_SEEN) || !defined(OFF_TASK_MM)
#error "build with the -D constants of lean.py"
#endif

#define DATA_MAX 4096      // payload bytes per event
#define ENV_CHUNKS 8       // the env block goes out in up to 8 x 4 KiB; beyond: F_TRUNCATED
#define STREAM_CAP 65536   // bytes captured per run per stream; more is flagged truncated
#define CLONE_NEWNET_ 0x40000000ULL

// Event types:
//   EV_EXEC        a run starts; data = filename; aux = netns inode of the task
//   EV_ENV         a chunk of the run's env block; aux = chunk index; F_LAST on the last
//   EV_EXIT        the run's process is gone; code = task->exit_code (a wait status)
//   EV_STDOUT      bytes a task of the run wrote to the run's stdout file
//   EV_STDERR      ... to its stderr file
//   EV_NETNS_NEW   clone with CLONE_NEWNET; aux = child pid, code = netns inode, cookie
//   EV_NETNS_SEEN  a task exited in a netns other than its leader's/parent's; code = inode
// Flags:
//   F_TRUNCATED    data cut (env > 32 KiB, a write > 4 KiB, a stream past STREAM_CAP)
//   F_LAST         EV_ENV: the last chunk
//   F_LOST         EV_EXIT: some events of this run could not be queued
//   F_SAME_FILE    EV_EXEC: stdout and stderr are the same open file

struct event {
    u32 type;
    u32 pid;         // tgid
    u32 tid;
    u32 ppid;        // EV_EXEC: tgid of the real parent
    u64 ts;          // boot-time ns
    u64 run;         // run key (boot-time ns of its exec), 0 = none
    u64 parent_run;  // EV_EXEC: the run of the task that exec'd the plugin
    u64 cookie;      // EV_NETNS_*: net->net_cookie (never reused, unlike inodes)
    u32 parent_pid;  // EV_EXEC: root pid of parent_run
    s32 code;
    u32 flags;
    u32 aux;
    u32 len;         // bytes of data
    u32 pad;
    char comm[16];
    u8 data[DATA_MAX];
};

struct task_info {
    u64 run;
    u32 root;  // tgid of the run's plugin process
    u32 pad;
};

struct run_state {
    u64 out_file;  // struct file * of fd 1 at exec
    u64 err_file;  // ... fd 2
    u32 out_bytes;
    u32 err_bytes;
    u32 flags;
    u32 pad;
};

struct dir_key {
    char path[PATH_MAX_];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(scratch, struct event, 1);
BPF_PERCPU_ARRAY(lost, u64, 2);                  // [0] events, [1] of them EV_EXEC: whole runs
BPF_HASH(bin_dirs, struct dir_key, u8, MAX_BIN_DIRS);
BPF_HASH(tracked, u32, struct task_info, 16384);
BPF_HASH(runs, u64, struct run_state, 4096);
BPF_TABLE("lru_hash", u64, u8, seen_ns, 4096);  // net_cookie of namespaces already reported

#define RD(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

static __always_inline struct event *new_event(u32 type, u64 run) {
    int zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    __builtin_memset(e, 0, __builtin_offsetof(struct event, comm));  // the per-CPU scratch holds the last one
    u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->ts = bpf_ktime_get_boot_ns();
    e->run = run;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void mark_lost(u32 type, u64 run) {
    int zero = 0, one = 1;
    u64 *n = lost.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    if (type == EV_EXEC) {
        n = lost.lookup(&one);
        if (n)
            __sync_fetch_and_add(n, 1);
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

static __always_inline const void *task_net(const void *task) {
    const void *nsproxy = 0, *net = 0;
    if (!task || RD(nsproxy, task, OFF_TASK_NSPROXY) || !nsproxy)
        return 0;  // past exit_task_namespaces
    RD(net, nsproxy, OFF_NSPROXY_NET_NS);
    return net;
}

static __always_inline u32 net_inum(const void *net) {
    u32 inum = 0;
    if (net)
        RD(inum, net, OFF_NET_NS_INUM);
    return inum;
}

static __always_inline u64 net_cookie(const void *net) {
    u64 c = 0;
    if (net)
        RD(c, net, OFF_NET_COOKIE);
    return c;
}

static __always_inline u64 task_file(const void *task, u32 fd) {
    const void *files = 0, *fdt = 0, *arr = 0;
    u64 file = 0;
    u32 max = 0;
    if (RD(files, task, OFF_TASK_FILES) || !files)
        return 0;
    if (RD(fdt, files, OFF_FILES_FDT) || !fdt)
        return 0;
    if (RD(max, fdt, OFF_FDT_MAX_FDS) || fd >= max)
        return 0;
    if (RD(arr, fdt, OFF_FDT_FD) || !arr)
        return 0;
    RD(file, arr, (u64)fd * 8);
    return file;
}

#include "bin_dir.h"

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct event *e = new_event(EV_EXEC, 0);
    if (!e)
        return 0;
    unsigned short loc = args->data_loc_filename & 0xFFFF;
    const char *fname = (const char *)args + loc;
    if (bpf_probe_read_kernel_str(e->data, PATH_MAX_, fname) <= 0 || e->data[0] != '/')
        return 0;
    if (!bin_dir_key(e) || !bin_dirs.lookup((struct dir_key *)e->data))
        return 0;
    u32 pid = args->pid, old = args->old_pid;
    struct task_info *self = tracked.lookup(&old);
    if (self && self->root == pid)
        return 0;  // a run's own process exec'ing a plugin (a wrapper script): still the same run
    // current is the task with the new image (and its new mm).
    const void *task = (const void *)bpf_get_current_task();
    u64 run = bpf_ktime_get_boot_ns();
    e->run = run;
    e->ts = run;
    e->tid = old;
    if (self) {
        e->parent_run = self->run;
        e->parent_pid = self->root;
    }
    const void *parent = 0;
    u32 ppid = 0;
    if (!RD(parent, task, OFF_TASK_REAL_PARENT) && parent)
        RD(ppid, parent, OFF_TASK_TGID);
    e->ppid = ppid;
    struct task_info ti = {.run = run, .root = pid};
    tracked.update(&pid, &ti);
    if (old != pid)
        tracked.delete(&old);
    // stdout and stderr by their open files, not their numbers: a write to fd
    // 1 after dup2 is still the file the runtime reads.
    struct run_state rs = {};
    rs.out_file = task_file(task, 1);
    rs.err_file = task_file(task, 2);
    if (rs.out_file && rs.out_file == rs.err_file)
        rs.flags |= F_SAME_FILE;
    runs.update(&run, &rs);
    e->flags = rs.flags;
    e->aux = net_inum(task_net(task));
    int n = bpf_probe_read_kernel_str(e->data, PATH_MAX_, fname);  // in_bin_dir cut it
    e->len = n > 0 ? n - 1 : 0;
    if (submit(e) != 0)
        return 0;

    // The env block of the new image, [env_start, env_end) in user memory.
    const void *mm = 0;
    u64 start = 0, end = 0;
    if (RD(mm, task, OFF_TASK_MM) || !mm)
        return 0;
    RD(start, mm, OFF_MM_ENV_START);
    RD(end, mm, OFF_MM_ENV_END);
    u64 total = end > start ? end - start : 0;
    for (int i = 0; i < ENV_CHUNKS; i++) {
        u64 off = (u64)i * DATA_MAX;
        e = new_event(EV_ENV, run);
        if (!e)
            return 0;
        e->tid = old;
        e->aux = i;
        u64 len = total > off ? total - off : 0;
        if (len > DATA_MAX)
            len = DATA_MAX;
        else
            e->flags |= F_LAST;
        if (i == ENV_CHUNKS - 1 && total > off + DATA_MAX)
            e->flags |= F_TRUNCATED | F_LAST;
        if (len > 0 && bpf_probe_read_user(e->data, len, (const void *)(start + off)) != 0)
            e->flags |= F_TRUNCATED | F_LAST;  // unreadable: say so, send nothing
        else
            e->len = len;
        submit(e);
        if (e->flags & F_LAST)
            break;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = args->parent_pid, child = args->child_pid;
    struct task_info *ti = tracked.lookup(&parent);
    if (ti) {
        struct task_info copy = *ti;
        tracked.update(&child, &copy);
    }
    return 0;
}

// A task in a netns other than its group leader's (a thread that unshared:
// runtimes make the container's netns on a thread) or, for a leader, its
// parent's (unshare -n, a container's init). Reported once per namespace, by
// net_cookie: inode numbers are reused as soon as a namespace is freed.
static __always_inline void netns_seen(const void *task, u32 tid) {
    const void *mine = task_net(task);
    if (!mine)
        return;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    const void *other = 0;
    if (tid != tgid)
        RD(other, task, OFF_TASK_GROUP_LEADER);
    else
        RD(other, task, OFF_TASK_REAL_PARENT);
    const void *theirs = task_net(other);
    if (!theirs && tid != tgid) {
        // The leader is already past exit_task_namespaces (a thread dying in
        // exit_group): compare with the process's parent instead.
        other = 0;
        RD(other, task, OFF_TASK_REAL_PARENT);
        theirs = task_net(other);
    }
    if (!theirs || theirs == mine)
        return;
    u64 cookie = net_cookie(mine);
    if (seen_ns.lookup(&cookie))
        return;
    u8 one = 1;
    seen_ns.update(&cookie, &one);
    struct event *e = new_event(EV_NETNS_SEEN, 0);
    if (!e)
        return;
    e->code = net_inum(mine);
    e->cookie = cookie;
    submit(e);
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    const void *task = (const void *)bpf_get_current_task();
    u32 tid = args->pid;
    struct task_info *ti = tracked.lookup(&tid);
    if (!ti) {
        netns_seen(task, tid);
        return 0;
    }
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
    // The last thread's exit_code is the group's: do_group_exit passes
    // signal->group_exit_code to every thread's do_exit.
    s32 code = 0;
    RD(code, task, OFF_TASK_EXIT_CODE);
    e->code = code;
    struct run_state *rs = runs.lookup(&run);
    if (rs) {
        e->flags = rs->flags & (F_TRUNCATED | F_LOST);
        runs.delete(&run);
    }
    submit(e);
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask) {
    if (!(args->clone_flags & CLONE_NEWNET_))
        return 0;
    // This tracepoint has no task pointer; the new task is the last one
    // linked into its parent's children list (copy_process adds it before the
    // tracepoint): current->children.prev, checked by pid. With CLONE_PARENT
    // or CLONE_THREAD it is elsewhere: the check fails and the inode is 0.
    const void *cur = (const void *)bpf_get_current_task();
    const void *prev = 0, *child = 0;
    u32 pid = 0;
    if (!RD(prev, cur, OFF_TASK_CHILDREN + 8) && prev) {
        child = (const char *)prev - OFF_TASK_SIBLING;
        if (RD(pid, child, OFF_TASK_PID) || pid != (u32)args->pid)
            child = 0;
    }
    struct event *e = new_event(EV_NETNS_NEW, 0);
    if (!e)
        return 0;
    e->aux = args->pid;
    const void *net = task_net(child);
    e->code = net_inum(net);
    e->cookie = net_cookie(net);
    if (e->cookie) {
        u8 one = 1;
        seen_ns.update(&e->cookie, &one);  // reported here: not again at its exits
    }
    u32 tid = e->tid;
    struct task_info *ti = tracked.lookup(&tid);
    if (ti)
        e->run = ti->run;
    submit(e);
    return 0;
}

// syscalls:sys_enter_write, attached by lean.py while runs are alive. Not
// named tracepoint__*, so BCC does not attach it at load.
struct sys_enter_write_args {  // events/syscalls/sys_enter_write/format
    u64 common;
    s32 nr;
    u32 pad;
    u64 fd;
    u64 buf;
    u64 count;
};

int lean_write(struct sys_enter_write_args *args) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct task_info *ti = tracked.lookup(&tid);
    if (!ti)
        return 0;
    u64 run = ti->run;
    struct run_state *rs = runs.lookup(&run);
    if (!rs)
        return 0;
    u32 fd = (u32)args->fd;
    u64 file = task_file((const void *)bpf_get_current_task(), fd);
    if (!file)
        return 0;
    u32 type;
    u32 *seen;
    if (file == rs->out_file && (!(rs->flags & F_SAME_FILE) || fd != 2)) {
        type = EV_STDOUT;
        seen = &rs->out_bytes;
    } else if (file == rs->err_file) {
        type = EV_STDERR;
        seen = &rs->err_bytes;
    } else {
        return 0;  // another file: a log, a socket, a sub-plugin's pipe
    }
    if (*seen >= STREAM_CAP)
        return 0;
    struct event *e = new_event(type, run);
    if (!e)
        return 0;
    u64 len = args->count;  // unsigned all the way, so the verifier sees 0..DATA_MAX
    if (len > DATA_MAX) {
        len = DATA_MAX;
        e->flags |= F_TRUNCATED;
    }
    if (len > 0 && bpf_probe_read_user(e->data, len, (const void *)args->buf) != 0)
        return 0;
    *seen += len;
    if (*seen >= STREAM_CAP) {
        e->flags |= F_TRUNCATED;
        rs->flags |= F_TRUNCATED;
    }
    e->len = len;
    submit(e);
    return 0;
}
