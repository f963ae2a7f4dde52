/* corefour guest runtime: the boot contract (CONTRACT.md) and a few helpers. Freestanding. */
#ifndef C4_H
#define C4_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define C4_BOOT_INFO_MAGIC 0x49423443u /* "C4BI" */

/* At the address in rdi on entry (0x2000). Little-endian, packed as laid out. */
struct c4_boot_info {
    u32 magic;
    u32 version;
    u32 vcpus;
    u32 cmdline_len;
    u64 cmdline_addr;   /* NUL-terminated */
    u64 mem_size;       /* bytes of RAM in total */
    u64 low_mem_end;    /* RAM is [0, low_mem_end) ... */
    u64 high_mem_size;  /* ... and [4 GiB, 4 GiB + high_mem_size) */
    u64 free_start;     /* first byte not used by the image, stacks or initrd */
    u64 stacks_base;    /* vCPU i's boot stack: [stacks_base + i*stack_size, +stack_size) */
    u64 stack_size;
    u64 sys_mmio;       /* debug-exit register (u32 write) for ring-3 code */
    u64 serial_mmio;    /* 16550 registers, one byte each, for ring-3 code */
    u64 initrd_addr;
    u64 initrd_size;
    u64 kernel_start;
    u64 kernel_end;
};

/* Written by the guest program; called on every vCPU with its index (0 = boot vCPU). */
void c4_main(const struct c4_boot_info *info, u32 cpu);

/* Output: port 0x3f8 in ring 0, the serial MMIO mirror in ring 3 (chosen at run time). */
void c4_putc(char c);
void c4_puts(const char *s);
void c4_put_hex(u64 v);
void c4_put_dec(u64 v);
/* Ends the VM with `code` (port 0xf4 in ring 0, MMIO in ring 3). Never returns. */
__attribute__((noreturn)) void c4_exit(u32 code);
/* Stops this vCPU for good (cli; hlt). */
__attribute__((noreturn)) void c4_halt(void);
/* Drops to ring 3 and calls fn(arg) on `stack_top`; fn must end with c4_exit. */
__attribute__((noreturn)) void c4_enter_user(void (*fn)(void *), void *arg, void *stack_top);

/* The value of `key=` on the command line as a number, or `dflt`. */
u64 c4_cmdline_u64(const struct c4_boot_info *info, const char *key, u64 dflt);

static inline int c4_cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

typedef struct { volatile u32 v; } c4_lock;
static inline void c4_lock_acquire(c4_lock *l)
{
    while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
        while (l->v)
            __asm__ volatile("pause");
}
static inline void c4_lock_release(c4_lock *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }

#endif
