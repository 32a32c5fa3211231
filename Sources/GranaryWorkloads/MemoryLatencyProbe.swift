import Granary
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The machine's memory latency, measured by chasing pointers through a random cycle of cache
/// lines in a buffer larger than the caches. `granary bench` measures it before and after a run,
/// because the workloads are bound by cache misses. On the project's machine it stayed at
/// 150-190 ns through runs at full and at half speed: the slow spells show in
/// ``CoreToCoreProbe`` instead.
package final class MemoryLatencyProbe {
    private let lines: Int
    private let table: UnsafeMutablePointer<UInt64>
    /// Where the last chase ended (kept so the loads are not optimised away).
    package private(set) var lastPosition: UInt64 = 0

    /// A probe over `megabytes` MiB (one 64-byte line per hop).
    package init(megabytes: Int = 64, seed: UInt64 = 1) {
        lines = max(2, (megabytes << 20) / 64)
        table = .allocate(capacity: lines * 8)
        var order = Array(0..<lines)
        var random = WorkloadRandom(seed: seed)
        order.shuffle(using: &random)
        for index in 0..<lines {
            table[order[index] * 8] = UInt64(order[(index + 1) % lines] * 8)
        }
    }

    deinit { table.deallocate() }

    /// Nanoseconds per dependent load, over `hops` loads.
    package func measure(hops: Int = 500_000) -> Double {
        var position = lastPosition
        let start = monotonicNanoseconds()
        for _ in 0..<hops { position = table[Int(position)] }
        let elapsed = monotonicNanoseconds() - start
        lastPosition = position
        return Double(elapsed) / Double(max(1, hops))
    }
}

/// How long one cache line takes to move between the two threads of a ping-pong, which is what
/// the engine's message rings and locks pay on every handoff between cores. On a virtual machine
/// it depends on where the host runs the virtual CPUs (two hyperthreads of one core, two cores of
/// one cache complex, or further apart) and can change while a benchmark runs: measured here it
/// went from 60-110 ns to 26 ns and back within a minute, and the benchmarks' throughput with it.
package enum CoreToCoreProbe {
    /// `@unchecked Sendable`: the word is an atomic; the class only carries it to the thread.
    private final class Shared: @unchecked Sendable {
        let word = Atomic<Int>(0)
        let rounds: Int
        init(rounds: Int) { self.rounds = rounds }
    }

    /// Nanoseconds per one-way handoff of a cache line, over `rounds` round trips.
    package static func measure(rounds: Int = 100_000) -> Double {
        let shared = Shared(rounds: rounds)
        var thread = pthread_t()
        let context = Unmanaged.passRetained(shared).toOpaque()
        guard pthread_create(&thread, nil, { raw in
            let shared = Unmanaged<Shared>.fromOpaque(raw!).takeRetainedValue()
            for round in 0..<shared.rounds {
                while shared.word.load(ordering: .acquiring) != 2 * round + 1 {}
                shared.word.store(2 * round + 2, ordering: .releasing)
            }
            return nil
        }, context) == 0 else {
            Unmanaged<Shared>.fromOpaque(context).release()
            return .nan
        }
        let start = monotonicNanoseconds()
        for round in 0..<rounds {
            shared.word.store(2 * round + 1, ordering: .releasing)
            while shared.word.load(ordering: .acquiring) != 2 * round + 2 {}
        }
        let elapsed = monotonicNanoseconds() - start
        pthread_join(thread, nil)
        return Double(elapsed) / Double(2 * max(1, rounds))
    }
}
