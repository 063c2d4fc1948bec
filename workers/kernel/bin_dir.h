// Cut the filename in e->data to its directory, in place (zero-filled to
// PATH_MAX_), the way user space wrote the keys of `bin_dirs`; 0 when it is
// not a file below a directory. The caller looks the key up (BCC rewrites
// map calls in the main file only). Loop state lives in map memory (e->aux),
// so the verifier sees one state per iteration.
//
// Shared by cnirun.bpf.c and lean.bpf.c: each defines struct event (with
// data[] and aux) before including it. Only code without map calls can be
// shared this way (new_event, submit: each program keeps its own).
static __always_inline int bin_dir_key(struct event *e) {
    volatile u32 *slash = &e->aux;  // volatile: clang must not keep it in a register
    *slash = 0;
    for (int j = 1; j < PATH_MAX_; j++) {
        char c = e->data[j];
        if (c == 0)
            break;
        if (c == '/')
            *slash = j;
    }
    u32 last = *slash;
    if (last == 0 || last >= PATH_MAX_ - 1)
        return 0;  // not below a dir
    u32 name = last + 1;
    asm volatile("" : "+r"(name));  // keep the mask: the verifier needs it, clang would drop it
    if (e->data[name & (PATH_MAX_ - 1)] == 0)
        return 0;  // no file name
    for (int j = 1; j < PATH_MAX_; j++) {
        if (j >= last)
            e->data[j] = 0;
    }
    return 1;
}
