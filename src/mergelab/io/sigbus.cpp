// A SIGBUS handler for memory-mapped inputs (see sigbus.py, which builds and loads this file).
//
// Reading a page of a file mapping that another process has truncated away raises SIGBUS; Python
// cannot handle it (its handler would return to the faulting read, which faults again), so the
// process used to die with a bare "Bus error". Here the faulting address is looked up in the ranges
// registered for the open inputs: if it falls in one, the handler writes one line naming the file,
// removes the files of the registered in-progress output folder and the folder, and ends the
// process with status 2 -- using only async-signal-safe calls (write, open, getdents64, unlinkat,
// rmdir, close, _exit). A fault anywhere else, or a SIGBUS sent by kill(), goes to the handler that
// was installed before (by default: the process dies of SIGBUS, as without this file).

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>

#ifdef __linux__
#include <sys/syscall.h>
#endif

namespace {

constexpr int kSlots = 1024;    // registered mappings at once (one per open input file)
constexpr int kPathBytes = 4096;  // PATH_MAX on Linux, with its terminating zero

struct Range {
    std::atomic<uintptr_t> start{0};  // 0: a free slot
    std::atomic<uintptr_t> end{0};
    char path[kPathBytes];
};

Range ranges[kSlots];
char output_dir[kPathBytes];
std::atomic<int> output_set{0};
struct sigaction previous;
std::atomic<int> exiting{0};
pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

const char kPrefix[] = "mergelab: error: ";
const char kMessage[] = ": file changed size while being read (truncated by another process?)\n";

void copy_path(char* to, const char* from) {
    int i = 0;
    for (; from[i] != 0 && i < kPathBytes - 1; ++i) to[i] = from[i];
    to[i] = 0;
}

void put(const char* text) {
    size_t n = 0;
    while (text[n] != 0) ++n;
    while (n > 0) {
        ssize_t done = write(2, text, n);
        if (done <= 0) return;
        text += done;
        n -= static_cast<size_t>(done);
    }
}

void remove_output() {
    if (output_set.load(std::memory_order_acquire) == 0) return;
#ifdef __linux__
    int fd = open(output_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        alignas(8) char buffer[8192];
        for (int pass = 0; pass < 64; ++pass) {  // entries removed while listing may be skipped: list again
            bool removed = false;
            lseek(fd, 0, SEEK_SET);
            long got;
            while ((got = syscall(SYS_getdents64, fd, buffer, sizeof buffer)) > 0) {
                for (long at = 0; at < got;) {
                    // struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, char name[]
                    unsigned short reclen;
                    char* record = buffer + at;
                    reclen = *reinterpret_cast<unsigned short*>(record + 16);
                    const char* name = record + 19;
                    bool dots = name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0));
                    if (!dots && unlinkat(fd, name, 0) == 0) removed = true;
                    at += reclen;
                }
            }
            if (!removed) break;
        }
        close(fd);
    }
    rmdir(output_dir);
#endif
}

void on_sigbus(int signal_number, siginfo_t* info, void* context) {
    const char* path = nullptr;
    if (info != nullptr && info->si_code > 0) {  // raised by a memory access, not sent by kill()
        uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
        for (int i = 0; i < kSlots && path == nullptr; ++i) {
            uintptr_t start = ranges[i].start.load(std::memory_order_acquire);
            if (start != 0 && address >= start && address < ranges[i].end.load(std::memory_order_acquire)) {
                path = ranges[i].path;
            }
        }
    }
    if (path == nullptr) {  // not a mapping of ours: the previous handler takes it
        sigaction(SIGBUS, &previous, nullptr);
        if (info == nullptr || info->si_code <= 0) raise(signal_number);  // delivered once this returns
        (void)context;
        return;  // a fault repeats under the previous handler
    }
    if (exiting.exchange(1) != 0) {  // another thread faulted too: one line, one clean-up
        for (;;) pause();
    }
    put(kPrefix);
    put(path);
    put(kMessage);
    remove_output();
    _exit(2);
}

// Installs the handler, or re-installs it if another one replaced it since (faulthandler.enable()).
int install_locked() {
    struct sigaction current;
    if (sigaction(SIGBUS, nullptr, &current) != 0) return -1;
    if ((current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == on_sigbus) return 0;
    struct sigaction action;
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGBUS, &action, &previous) == 0 ? 0 : -1;
}

}  // namespace

extern "C" {

int mergelab_sigbus_abi_version() { return 1; }

// Watches [start, start + length) as a mapping of `path`; returns its slot, or -1 (no free slot,
// or the handler could not be installed: then a fault there kills the process as before).
int mergelab_sigbus_watch(uintptr_t start, uintptr_t length, const char* path) {
    if (start == 0 || length == 0) return -1;
    pthread_mutex_lock(&lock);
    int slot = -1;
    if (install_locked() == 0) {
        for (int i = 0; i < kSlots; ++i) {
            if (ranges[i].start.load(std::memory_order_relaxed) == 0) {
                copy_path(ranges[i].path, path);
                ranges[i].end.store(start + length, std::memory_order_release);
                ranges[i].start.store(start, std::memory_order_release);
                slot = i;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return slot;
}

void mergelab_sigbus_unwatch(int slot) {
    if (slot < 0 || slot >= kSlots) return;
    pthread_mutex_lock(&lock);
    ranges[slot].start.store(0, std::memory_order_release);
    ranges[slot].end.store(0, std::memory_order_release);
    pthread_mutex_unlock(&lock);
}

// The folder of the output being written (its files are removed on a fault); nullptr: none.
void mergelab_sigbus_output(const char* dir) {
    pthread_mutex_lock(&lock);
    output_set.store(0, std::memory_order_release);
    if (dir != nullptr) {
        copy_path(output_dir, dir);
        output_set.store(1, std::memory_order_release);
    }
    pthread_mutex_unlock(&lock);
}

}  // extern "C"
