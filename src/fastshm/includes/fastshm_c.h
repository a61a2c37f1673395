/* Small C helpers for fastshm._core: little-endian field access and atomics.
 *
 * The wire format and the segment header are little-endian whatever the host;
 * these helpers keep that in one place.  Unaligned access goes through memcpy,
 * which compilers turn into a single load or store where the target allows.
 */
#ifndef FASTSHM_C_H
#define FASTSHM_C_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline void fastshm_put_u16(char *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static inline void fastshm_put_u32(char *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void fastshm_put_u64(char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static inline uint16_t fastshm_get_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
static inline uint32_t fastshm_get_u32(const char *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static inline uint64_t fastshm_get_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

/* Slot generations live in shared memory and are read by other processes:
 * a release store by the writer pairs with an acquire load by the reader.
 * The pointer must be 8-byte aligned (the caller checks). */
static inline uint64_t fastshm_load_acquire_u64(const void *p) {
    return le64toh(__atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE));
}
static inline void fastshm_store_release_u64(void *p, uint64_t v) {
    __atomic_store_n((uint64_t *)p, htole64(v), __ATOMIC_RELEASE);
}

#endif
