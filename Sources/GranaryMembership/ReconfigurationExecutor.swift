import Foundation
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A thread of its own, at a raised priority where allowed, for one member's reconfiguration
/// and transaction-state recovery (the task that moves the engine prefers it:
/// `withTaskExecutorPreference`).
///
/// Why: recovery's steps are short, but each waits for the others' (the acknowledgements, the
/// votes, the moves), and the regions outside recovery keep committing meanwhile. On the Swift
/// cooperative pool, whose threads compete with the coordinators for the cores, a member saw the
/// last vote 3 to 6 ms after it was stored (measured on 2 cores with 2 busy coordinators); each
/// barrier added such a delay to the time the recovering regions stayed blocked.
///
/// The thread runs nice -10 (weight about 9x a default thread's), not at a real-time priority:
/// recovery takes the mailbox's claims, which wait for other threads by yielding the CPU, and a
/// real-time thread's yield gives no core to ordinary threads. An idle thread ends after a second
/// and the next job starts another, so the executor holds no thread while nothing recovers.
///
/// `@unchecked Sendable`: the queue and whether a thread runs (`guarded`) are read and written
/// only while `condition` is held; debug builds check it on every access (`lock()` records the
/// holder).
package final class ReconfigurationExecutor: TaskExecutor, @unchecked Sendable {
    private let condition = NSCondition()
    private struct Guarded {
        var queue: [UnownedJob] = []
        var threadRunning = false
    }
    private var unguarded = Guarded()
    /// The state `condition` guards (in debug builds, an access without it held traps).
    private var guarded: Guarded {
        _read { assertHeld(); yield unguarded }
        _modify { assertHeld(); yield &unguarded }
    }
    #if DEBUG
    /// The thread holding `condition` (`pthread_t` bits), 0 when none: debug builds only.
    private let holder = Atomic<UInt>(0)
    #endif
    /// The running thread (`pthread_t` bits), 0 when none.
    private let thread = Atomic<UInt>(0)
    private let name: String
    /// The niceness asked for the thread (ignored where not allowed).
    package static let niceness: Int32 = -10
    /// How long the thread waits for a job before it ends.
    package static let idleNanoseconds: UInt64 = 1_000_000_000
    /// Whether a thread runs now (it ends once idle for ``idleNanoseconds``).
    package var hasThread: Bool { thread.load(ordering: .relaxed) != 0 }

    package init(name: String) { self.name = name }

    package func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        lock()
        guarded.queue.append(job)
        let start = !guarded.threadRunning
        guarded.threadRunning = true
        condition.signal()
        unlock()
        if start { startThread() }
    }

    private func lock() {
        condition.lock()
        #if DEBUG
        holder.store(UInt(pthread_self()), ordering: .relaxed)
        #endif
    }

    private func unlock() {
        #if DEBUG
        holder.store(0, ordering: .relaxed)
        #endif
        condition.unlock()
    }

    /// Waits on `condition` (held) until signalled or `deadline`; holds it again on return.
    private func wait(until deadline: Date) {
        #if DEBUG
        holder.store(0, ordering: .relaxed)
        #endif
        _ = condition.wait(until: deadline)
        #if DEBUG
        holder.store(UInt(pthread_self()), ordering: .relaxed)
        #endif
    }

    @inline(__always) private func assertHeld() {
        #if DEBUG
        assert(holder.load(ordering: .relaxed) == UInt(pthread_self()), "ReconfigurationExecutor state accessed without its lock")
        #endif
    }

    /// Whether the caller runs on this executor's thread: it may then block the thread for a
    /// short wait instead of suspending (a timer's wake-up would come through another thread).
    package var isCurrent: Bool { thread.load(ordering: .relaxed) == UInt(pthread_self()) }

    private func startThread() {
        let executor = self
        let thread = Thread {
            executor.thread.store(UInt(pthread_self()), ordering: .relaxed)
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, Self.niceness)
            executor.run()
        }
        thread.name = name
        thread.start()
    }

    private func run() {
        let me = asUnownedTaskExecutor()
        while true {
            lock()
            let idleSince = monotonicNanoseconds()
            while guarded.queue.isEmpty {
                if monotonicNanoseconds() - idleSince >= Self.idleNanoseconds {
                    guarded.threadRunning = false
                    thread.store(0, ordering: .relaxed)
                    unlock()
                    return
                }
                wait(until: Date(timeIntervalSinceNow: 0.25))
            }
            let job = guarded.queue.removeFirst()
            unlock()
            job.runSynchronously(on: me)
        }
    }
}
