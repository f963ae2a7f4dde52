/* The baseline of `corefour bench vmm`: the smallest VMM that does what corefour does for the
 * `pioloop` guest, with raw KVM ioctls. It creates a VM like corefour's (irqchip, PIT, the same
 * memory size, CPUID, long mode with identity-mapped 2 MiB pages), runs code that prints "H\n"
 * to COM1, does N port writes to 0x80 (`out; dec rcx; jnz`, the loop pioloop.c runs), and
 * exits through port 0xf4.
 *
 *   kvm_pio_loop N [--stats]     --stats: print "rss_kib=.. guest_resident_kib=.." to stderr */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM_SIZE (64ul << 20)
#define PML4 0x10000ul
#define PDPT 0x11000ul
#define PD 0x12000ul
#define GDT 0x1000ul
#define CODE 0x100000ul

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static const uint8_t code[] = {
    0x66, 0xba, 0xf8, 0x03, /* mov $0x3f8, %dx */
    0xb0, 'H',              /* mov $'H', %al */
    0xee,                   /* out %al, (%dx) */
    0xb0, '\n',             /* mov $'\n', %al */
    0xee,                   /* out %al, (%dx) */
    0x48, 0x85, 0xc9,       /* test %rcx, %rcx */
    0x74, 0x07,             /* jz done */
    0xe6, 0x80,             /* loop: out %al, $0x80 */
    0x48, 0xff, 0xc9,       /* dec %rcx */
    0x75, 0xf9,             /* jnz loop */
    0x31, 0xc0,             /* done: xor %eax, %eax */
    0xe7, 0xf4,             /* out %eax, $0xf4 */
    0xf4,                   /* hlt */
};

static long status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key)))
            v = strtol(line + strlen(key), NULL, 10);
    fclose(f);
    return v;
}

static void stats(uint8_t *mem)
{
    size_t pages = MEM_SIZE / 4096, resident = 0;
    unsigned char *vec = malloc(pages);
    if (vec && mincore(mem, MEM_SIZE, vec) == 0)
        for (size_t i = 0; i < pages; i++)
            resident += vec[i] & 1;
    free(vec);
    fprintf(stderr, "kvm_pio_loop stats: rss_kib=%ld anon_kib=%ld guest_resident_kib=%zu\n",
            status_kib("VmRSS:"), status_kib("RssAnon:"), resident * 4);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s N [--stats]\n", argv[0]);
        return 1;
    }
    unsigned long n = strtoul(argv[1], NULL, 10);
    int want_stats = argc > 2 && !strcmp(argv[2], "--stats");

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("KVM_CREATE_PIT2");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    /* Identity map of the first 4 GiB (as corefour maps RAM and the MMIO hole). */
    uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT), *pd = (uint64_t *)(mem + PD);
    pml4[0] = PDPT | 7;
    for (int g = 0; g < 4; g++)
        pdpt[g] = (PD + g * 4096) | 7;
    for (uint64_t i = 0; i < 4 * 512; i++)
        pd[i] = (i << 21) | 0x87;
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[1] = 0x00af9b000000ffff;
    gdt[2] = 0x00cf93000000ffff;
    memcpy(mem + CODE, code, sizeof code);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct {
        struct kvm_cpuid2 c;
        struct kvm_cpuid_entry2 e[256];
    } cpuid = {.c.nent = 256};
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
        die("KVM_SET_CPUID2");

    struct kvm_sregs s;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
        die("KVM_GET_SREGS");
    struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1,
                             .s = 1, .l = 1, .g = 1};
    struct kvm_segment ds = {.base = 0, .limit = 0xffffffff, .selector = 16, .type = 3, .present = 1,
                             .s = 1, .db = 1, .g = 1};
    s.cs = cs;
    s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.gdt.base = GDT;
    s.gdt.limit = 23;
    s.cr0 = 0x80010033;
    s.cr3 = PML4;
    s.cr4 = 0x620;
    s.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = CODE, .rsp = 0x200000, .rflags = 2, .rcx = n};
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS");

    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x3f8) {
                if (write(1, data, run->io.size) < 0)
                    die("write");
            } else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0xf4) {
                if (want_stats)
                    stats(mem);
                return data[0];
            }
            break;
        }
        case KVM_EXIT_HLT:
            return 0;
        case KVM_EXIT_SHUTDOWN:
            fprintf(stderr, "kvm_pio_loop: triple fault\n");
            return 2;
        default:
            fprintf(stderr, "kvm_pio_loop: unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
}
