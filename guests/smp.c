/* Every vCPU prints its index; the boot vCPU exits once all have checked in. */
#include "c4.h"

static c4_lock print_lock;
static volatile u32 checked_in;

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    c4_lock_acquire(&print_lock);
    c4_puts("smp: cpu ");
    c4_put_dec(cpu);
    c4_puts(" online\n");
    c4_lock_release(&print_lock);
    __atomic_add_fetch(&checked_in, 1, __ATOMIC_SEQ_CST);
    if (cpu != 0)
        c4_halt();
    while (__atomic_load_n(&checked_in, __ATOMIC_SEQ_CST) < info->vcpus)
        __asm__ volatile("pause");
    c4_lock_acquire(&print_lock);
    c4_puts("smp: all ");
    c4_put_dec(info->vcpus);
    c4_puts(" cpus checked in\n");
    c4_exit(0);
}
