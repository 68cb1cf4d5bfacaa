/* Keep large allocations mapped after free and hand them out again (LD_PRELOAD; train/host.py).

   XLA:CPU allocates each execution's temporaries as one block (1.8 GB on `small`, 700 MiB per
   emulated device at fsdp=8) and frees it when the execution ends. glibc serves a block above
   its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so every step
   the kernel zero-fills the whole block again: 1.9 s of kernel CPU time in a 2.7 s `small`
   step on a 2-core machine. This library takes malloc / posix_memalign / aligned_alloc / memalign
   requests of at least DEEPFLAX_BLOCK_CACHE_MIN bytes (default 32 MiB) and, on free, keeps the block
   mapped (its pages stay resident) for the next request of a size it fits (block <= 5/4 of the
   request). A block unused for more than DEEPFLAX_BLOCK_CACHE_DECAY_S seconds (default 10) is
   unmapped at the next large request or free: sizes that do not recur are not kept, while a
   loop of steps reuses its blocks within a step. Blocks beyond DEEPFLAX_BLOCK_CACHE_MAX_BYTES
   kept unused (default: half of physical memory) are unmapped on free.
   Everything else goes to glibc unchanged.

   Blocks are 2 MiB-aligned mappings (transparent huge pages where the kernel gives them on
   request), so free() recognises a kept block with one test on the pointer before any lock:
   glibc's own chunks are never 2 MiB-aligned (mapped chunks start 16 bytes into their page),
   and a heap chunk that happens to be is looked up and passed on. calloc is not taken (a
   reused block is not zero). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define ALIGN ((size_t)2 << 20)
#define SLOTS 1024

/* glibc's own entry points, exported for exactly this use (no dlsym while allocating) */
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static struct { char *p; size_t n; int used; double freed; } slot[SLOTS];
static size_t min_bytes = (size_t)32 << 20, max_unused, unused;
static double decay_s = 10;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* a child forked while another thread held the lock would find it held forever */
static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }

__attribute__((constructor)) static void configure(void) {
    pthread_atfork(lock, unlock, unlock);
    const char *e = getenv("DEEPFLAX_BLOCK_CACHE_MIN");
    if (e && *e) min_bytes = strtoull(e, NULL, 10);
    if (min_bytes < ALIGN) min_bytes = ALIGN;  /* each block is at least one 2 MiB page */
    e = getenv("DEEPFLAX_BLOCK_CACHE_DECAY_S");
    if (e && *e) decay_s = strtod(e, NULL);
    e = getenv("DEEPFLAX_BLOCK_CACHE_MAX_BYTES");
    max_unused = e && *e ? strtoull(e, NULL, 10)
                         : (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) / 2;
}

static int is_ours(const void *p) { return p && ((uintptr_t)p & (ALIGN - 1)) == 0; }

static char *map_aligned(size_t n) {  /* n: a multiple of ALIGN */
    char *raw = mmap(NULL, n + ALIGN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *p = (char *)(((uintptr_t)raw + ALIGN - 1) & ~(ALIGN - 1));
    if (p > raw) munmap(raw, p - raw);
    munmap(p + n, raw + ALIGN - p);
    madvise(p, n, MADV_HUGEPAGE);
    return p;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* under the lock: unmap the blocks unused for more than decay_s seconds (as jemalloc lets its
   unused pages decay), so that sizes that do not recur are not kept; a loop of steps reuses its
   blocks within a step's time */
static void purge(void) {
    double t = now();
    for (int i = 0; i < SLOTS; i++)
        if (slot[i].p && !slot[i].used && t - slot[i].freed > decay_s) {
            munmap(slot[i].p, slot[i].n);
            unused -= slot[i].n;
            slot[i].p = NULL;
        }
}

/* a kept block of at least n bytes (and at most 5n/4), or a new one; NULL: let glibc serve it */
static void *take(size_t want) {
    size_t n = (want + ALIGN - 1) & ~(ALIGN - 1);
    int best = -1, empty = -1;
    lock();
    for (int i = 0; i < SLOTS; i++) {
        if (!slot[i].p) { if (empty < 0) empty = i; continue; }
        if (!slot[i].used && slot[i].n >= n && slot[i].n - n <= n / 4 && (best < 0 || slot[i].n < slot[best].n))
            best = i;
    }
    if (best >= 0) {
        slot[best].used = 1;
        unused -= slot[best].n;
        unlock();
        return slot[best].p;
    }
    purge();
    for (int i = 0; i < SLOTS && empty < 0; i++)
        if (!slot[i].p) empty = i;
    char *p = empty >= 0 ? map_aligned(n) : NULL;  /* a full table: glibc serves it */
    if (p) slot[empty].p = p, slot[empty].n = n, slot[empty].used = 1;
    unlock();
    return p;
}

static int find(const void *p) {  /* under mu */
    for (int i = 0; i < SLOTS; i++)
        if (slot[i].p == p && slot[i].used) return i;
    return -1;
}

/* 1 if p was a block of ours (now kept or unmapped), 0 if it is glibc's */
static int give_back(void *p) {
    if (!is_ours(p)) return 0;
    lock();
    int i = find(p);
    if (i >= 0 && unused + slot[i].n <= max_unused) {
        slot[i].used = 0;
        slot[i].freed = now();
        unused += slot[i].n;
    } else if (i >= 0) {
        munmap(slot[i].p, slot[i].n);
        slot[i].p = NULL;
    }
    if (i >= 0) purge();
    unlock();
    return i >= 0;
}

static size_t size_of(const void *p) {  /* 0 if not a block of ours */
    size_t n = 0;
    if (!is_ours(p)) return 0;
    lock();
    int i = find(p);
    if (i >= 0) n = slot[i].n;
    unlock();
    return n;
}

void *malloc(size_t n) {
    void *p = n >= min_bytes ? take(n) : NULL;
    return p ? p : __libc_malloc(n);
}

void *aligned_alloc(size_t align, size_t n) {
    void *p = n >= min_bytes && align <= ALIGN ? take(n) : NULL;
    return p ? p : __libc_memalign(align, n);
}

void *memalign(size_t align, size_t n) { return aligned_alloc(align, n); }

int posix_memalign(void **out, size_t align, size_t n) {
    if (align == 0 || (align & (align - 1)) || align % sizeof(void *)) return EINVAL;
    void *p = aligned_alloc(align, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

void free(void *p) {
    if (!give_back(p)) __libc_free(p);
}

void *realloc(void *p, size_t n) {
    size_t have = size_of(p);
    if (!have) return __libc_realloc(p, n);
    if (n <= have) return p;
    void *q = malloc(n);
    if (q) {
        memcpy(q, p, have);
        free(p);
    }
    return q;
}

size_t malloc_usable_size(void *p) {
    static size_t (*glibc)(void *);
    size_t n = size_of(p);
    if (n) return n;
    if (!glibc) glibc = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
    return glibc(p);
}
