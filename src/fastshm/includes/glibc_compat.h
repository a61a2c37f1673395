/* Bind fastshm._core to glibc symbol versions old enough for manylinux2014.
 *
 * Force-included (gcc/clang `-include glibc_compat.h`) by setup.py only when
 * FASTSHM_GLIBC_COMPAT=1, which tools/build-wheels.sh sets: it builds the
 * wheels on a new glibc (Debian 12, 2.36) without a manylinux container.
 * cibuildwheel builds inside a manylinux2014 image, whose glibc 2.17 gives
 * these versions by itself, so it leaves this header out.
 *
 * Built plainly here, the core needs four symbols newer than 2.17:
 *   shm_open, shm_unlink  GLIBC_2.34  (moved from librt into libc in 2.34)
 *   fcntl64               GLIBC_2.28  (fcntl under _FILE_OFFSET_BITS=64)
 *   fstat64               GLIBC_2.33  (before 2.33 an inline wrapper around
 *                                      __fxstat64 from libc_nonshared.a)
 * Each is bound below to the version every glibc since the architecture's
 * first release still exports (compat symbols are never removed), so
 * `auditwheel show` reports manylinux_2_17 and the wheel runs from glibc 2.17
 * (CentOS 7, Ubuntu 18.04, Debian 10/11 ...) to today's.  On a 64-bit
 * architecture fcntl and fcntl64, stat and stat64 share one ABI.
 *
 * On glibc < 2.34 shm_open@GLIBC_2.2.5 lives in librt.so.1, so setup.py also
 * links librt.so.1 explicitly (`-l:librt.so.1` between --no-as-needed and
 * --as-needed; a plain -lrt is dropped as unused on glibc >= 2.34).
 *
 * This header is read before Python.h and every system header, so it uses no
 * type and includes nothing: __gnu_linux__ (set by the compiler for glibc
 * Linux targets, not musl) is the only test available this early.
 *
 * Why not zig cc -target <arch>-linux-gnu.2.17, which also works: it is a
 * 400 MB toolchain and a second compiler to trust for two symbols' sake;
 * these pins are checked by auditwheel on every build and by the test suite
 * run against the wheel (x86_64, aarch64 under qemu, import on glibc 2.31).
 */
#ifndef FASTSHM_GLIBC_COMPAT_H
#define FASTSHM_GLIBC_COMPAT_H

#if defined(__gnu_linux__)
#  if defined(__x86_64__)
#    define FASTSHM_GLIBC_BASE "GLIBC_2.2.5"
#    define FASTSHM_STAT_VER 1 /* _STAT_VER_LINUX */
#  elif defined(__aarch64__)
#    define FASTSHM_GLIBC_BASE "GLIBC_2.17"
#    define FASTSHM_STAT_VER 0 /* _STAT_VER_KERNEL */
#  else
#    error "glibc_compat.h pins symbol versions for x86_64 and aarch64 only"
#  endif

__asm__(".symver shm_open,shm_open@" FASTSHM_GLIBC_BASE);
__asm__(".symver shm_unlink,shm_unlink@" FASTSHM_GLIBC_BASE);
__asm__(".symver fcntl64,fcntl@" FASTSHM_GLIBC_BASE);
__asm__(".symver __fxstat64,__fxstat64@" FASTSHM_GLIBC_BASE);

/* fstat64 defined here, hidden, as libc_nonshared.a did before glibc 2.33:
 * calls to fstat in this translation unit resolve to it at link time. */
extern int fastshm_compat_fxstat64(int ver, int fd, void *buf) __asm__("__fxstat64");
__attribute__((visibility("hidden"), used))
int fastshm_compat_fstat64(int fd, void *buf) __asm__("fstat64");
int fastshm_compat_fstat64(int fd, void *buf)
{
    return fastshm_compat_fxstat64(FASTSHM_STAT_VER, fd, buf);
}
#endif /* __gnu_linux__ */

#endif /* FASTSHM_GLIBC_COMPAT_H */
