#if os(Linux)
import CPMem
#endif
import Foundation
import GranaryTransport
import Synchronization

/// Witnesses of this host's CPUs, for lease threads whose peers share their host (shared
/// memory): one thread pinned to each CPU this process may use, at real-time priority, noting
/// the time every ``interval``. A witness that ran late says its CPU was paused: the hypervisor
/// ran something else on that virtual CPU (steal), or the kernel, which does not preempt itself
/// here, held it. A node whose lease thread was on that CPU was paused with it, through no fault
/// of its own.
///
/// A lease thread treats such a pause as a pause of its own (FaRM's CM cannot tell a member that
/// stopped from one it could not see): as CM it restarts the members' clocks instead of
/// suspecting them (`ConfigurationManager.grantLeases`), as a member it does not take the CM for
/// silent. Seen on the 2-vCPU development host: one virtual CPU stopped for 100 ms (its steal
/// time grew by 100 ms at once) while the other ran the CM, whose 50 ms leases then ran out for
/// the two members on the stopped CPU (their lease threads slept 101 ms in a 10 ms sleep), and
/// both were removed as live nodes. A member that really failed is suspected one expiry after the
/// last pause: pauses postpone a removal by their own length, and no more.
///
/// One set of witnesses per process, shared by its lease threads (``acquire()``, ``release()``),
/// stopped when the last one leaves. No witness runs where a thread cannot be pinned; a witness
/// that cannot be pinned never reports a pause. Over RDMA verbs nothing is excused (peers may be
/// on other hosts, whose pauses this host cannot see; between the nodes of one host, see
/// `MembershipService.leaseLoop`).
///
/// `@unchecked Sendable`: the per-CPU words are atomics in one block allocated at init and freed
/// at deinit; each witness thread holds this object (retained) until it ends; `running` is an
/// atomic. No lock on the read side: lease threads ask every round.
package final class HostPauses: @unchecked Sendable {
    /// How often a witness notes the time.
    static let interval: UInt64 = 1_000_000
    /// Per witness, on a cache line of its own: [0] when it last ran, [1] when its last pause
    /// ended, [2] how long that pause was (monotonic ns; 0: none yet).
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private static let stride = 8  // 64 bytes
    let cpus: [Int32]
    private let running = Atomic<Bool>(true)
    private let threads = Mutex<[pthread_t]>([])

    private static let shared = Mutex<(users: Int, pauses: HostPauses?)>((0, nil))

    private init(cpus: [Int32]) {
        self.cpus = cpus
        words = .allocate(capacity: cpus.count * Self.stride)
        let now = monotonicNanoseconds()
        for index in 0..<cpus.count * Self.stride { (words + index).initialize(to: Atomic<UInt64>(index % Self.stride == 0 ? now : 0)) }
    }

    deinit {
        words.deinitialize(count: cpus.count * Self.stride)
        words.deallocate()
    }

    /// This process's witnesses, started by the first caller; nil where the CPUs cannot be
    /// listed or a thread cannot be started. Each call that returns witnesses is matched by one
    /// ``release()``.
    static func acquire() -> HostPauses? {
        shared.withLock { shared in
            if shared.pauses == nil { shared.pauses = start() }
            if shared.pauses != nil { shared.users += 1 }
            return shared.pauses
        }
    }

    /// Ends one ``acquire()``; the last stops the witnesses and waits for them.
    static func release() {
        let last: HostPauses? = shared.withLock { shared in
            guard shared.users > 0 else { return nil }
            shared.users -= 1
            guard shared.users == 0 else { return nil }
            defer { shared.pauses = nil }
            return shared.pauses
        }
        last?.stop()
    }

    /// The CPUs this process may run on (empty where they cannot be listed).
    package static var allowedCPUs: [Int32] {
        #if os(Linux)
        var mask = [UInt8](repeating: 0, count: 128)
        let written = granary_allowed_cpus(&mask, Int32(mask.count))
        guard written > 0 else { return [] }
        return (0..<Int(written) * 8).filter { mask[$0 / 8] & (1 << UInt8($0 % 8)) != 0 }.map { Int32($0) }
        #else
        return []
        #endif
    }

    /// The kernel's id of the calling thread (0 where there is none to give).
    package static var currentThreadID: Int32 {
        #if os(Linux)
        return granary_thread_id()
        #else
        return 0
        #endif
    }

    /// Pins thread `thread` (a kernel thread id; 0: the caller) to `cpu`; whether it could.
    package static func pin(thread: Int32, to cpu: Int32) -> Bool {
        #if os(Linux)
        return granary_pin_thread(thread, cpu) == 0
        #else
        return false
        #endif
    }

    private static func start() -> HostPauses? {
        #if os(Linux)
        let cpus = allowedCPUs
        guard !cpus.isEmpty else { return nil }
        let pauses = HostPauses(cpus: cpus)
        for slot in cpus.indices {
            var thread = pthread_t()
            let start = Unmanaged.passRetained(WitnessStart(pauses, slot)).toOpaque()
            guard pthread_create(&thread, nil, { raw in
                let start = Unmanaged<WitnessStart>.fromOpaque(raw!).takeRetainedValue()
                start.pauses.witness(start.slot)
                return nil
            }, start) == 0 else {
                Unmanaged<WitnessStart>.fromOpaque(start).release()
                pauses.stop()
                return nil
            }
            pauses.threads.withLock { $0.append(thread) }
        }
        return pauses
        #else
        return nil
        #endif
    }

    private final class WitnessStart: @unchecked Sendable {
        // Handed to exactly one thread.
        let pauses: HostPauses
        let slot: Int
        init(_ pauses: HostPauses, _ slot: Int) {
            self.pauses = pauses
            self.slot = slot
        }
    }

    /// Whether some CPU of this host had a pause longer than `longerThan` nanoseconds that ended
    /// after `since`, or is in one `now` (its witness is that late).
    func paused(since: UInt64, now: UInt64, longerThan: UInt64) -> Bool {
        for slot in cpus.indices {
            let last = words[slot * Self.stride].load(ordering: .relaxed)
            if now > last, now - last > longerThan { return true }
            if words[slot * Self.stride + 1].load(ordering: .acquiring) > since,
               words[slot * Self.stride + 2].load(ordering: .relaxed) > longerThan { return true }
        }
        return false
    }

    private func stop() {
        running.store(false, ordering: .relaxed)
        let threads = self.threads.withLock { threads in
            defer { threads = [] }
            return threads
        }
        for thread in threads { pthread_join(thread, nil) }
    }

    private func witness(_ slot: Int) {
        #if os(Linux)
        let cpu = cpus[slot]
        // Unpinned, a witness would follow a free CPU and see no pause.
        guard Self.pin(thread: 0, to: cpu) else {
            words[slot * Self.stride].store(UInt64.max, ordering: .relaxed)  // never reads as late
            return
        }
        var parameter = sched_param()
        parameter.sched_priority = 10
        _ = pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameter)
        Thread.current.name = "witness-cpu\(cpu)"
        var previous = monotonicNanoseconds()
        while running.load(ordering: .relaxed) {
            usleep(UInt32(Self.interval / 1_000))
            let now = monotonicNanoseconds()
            words[slot * Self.stride].store(now, ordering: .relaxed)
            // Late by more than an interval: a pause of that length (the consumer decides
            // whether it was long enough to matter).
            if now - previous > 2 * Self.interval {
                words[slot * Self.stride + 2].store(now - previous - Self.interval, ordering: .relaxed)
                words[slot * Self.stride + 1].store(now, ordering: .releasing)
            }
            previous = now
        }
        #endif
    }
}
