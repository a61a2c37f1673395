# The C declarations fastshm._core uses, in one place.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN
        EWOULDBLOCK
        ENOSPC
        EEXIST
        ENOENT
        EACCES
        EINVAL
        EPIPE
        ECONNRESET

cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    void *memmove(void *dest, const void *src, size_t n)
    int memcmp(const void *a, const void *b, size_t n)
    char *strerror(int errnum)

cdef extern from "<sys/types.h>" nogil:
    ctypedef long off_t
    ctypedef unsigned int mode_t
    ctypedef int pid_t
    ctypedef unsigned int uid_t
    ctypedef unsigned int gid_t

cdef extern from "<fcntl.h>" nogil:
    enum:
        O_RDONLY
        O_RDWR
        O_CREAT
        O_EXCL
        O_CLOEXEC
        F_OFD_SETLK
        F_OFD_GETLK
        F_RDLCK
        F_WRLCK
        F_UNLCK
        SEEK_SET
    struct flock:
        short l_type
        short l_whence
        off_t l_start
        off_t l_len
        pid_t l_pid
    int fcntl(int fd, int cmd, ...)
    int posix_fallocate(int fd, off_t offset, off_t len)

cdef extern from "<sys/stat.h>" nogil:
    struct stat:
        mode_t st_mode
        uid_t st_uid
        gid_t st_gid
        off_t st_size
    int fstat(int fd, stat *buf)
    int fchmod(int fd, mode_t mode)

cdef extern from "<sys/statvfs.h>" nogil:
    struct statvfs:
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_bavail
    int c_statvfs "statvfs"(const char *path, statvfs *buf)

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, off_t length)
    int close(int fd)
    pid_t getpid()
    int fchown(int fd, uid_t owner, gid_t group)

cdef extern from "<sys/mman.h>" nogil:
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_POPULATE
    void *MAP_FAILED
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int shm_open(const char *name, int oflag, mode_t mode)
    int shm_unlink(const char *name)

cdef extern from "<poll.h>" nogil:
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd *fds, nfds_t nfds, int timeout)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)

cdef extern from "fastshm_c.h" nogil:
    void fastshm_put_u16(char *p, uint16_t v)
    void fastshm_put_u32(char *p, uint32_t v)
    void fastshm_put_u64(char *p, uint64_t v)
    uint16_t fastshm_get_u16(const char *p)
    uint32_t fastshm_get_u32(const char *p)
    uint64_t fastshm_get_u64(const char *p)
    uint64_t fastshm_load_acquire_u64(const void *p)
    void fastshm_store_release_u64(void *p, uint64_t v)
