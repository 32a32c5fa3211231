import Granary
#if canImport(Glibc)
import Glibc
#endif

/// The machine's memory latency, measured by chasing pointers through a random cycle of cache
/// lines in a buffer larger than the caches. `granary bench` measures it before and after a run:
/// the workloads are bound by cache misses, so on a shared host whose memory system other
/// tenants load at times, a slow run shows up here too (a compute loop does not see it).
public final class MemoryLatencyProbe {
    private let lines: Int
    private let table: UnsafeMutablePointer<UInt64>
    /// Where the last chase ended (kept so the loads are not optimised away).
    public private(set) var lastPosition: UInt64 = 0

    /// A probe over `megabytes` MiB (one 64-byte line per hop).
    public init(megabytes: Int = 64, seed: UInt64 = 1) {
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
    public func measure(hops: Int = 500_000) -> Double {
        var position = lastPosition
        let start = monotonicNanoseconds()
        for _ in 0..<hops { position = table[Int(position)] }
        let elapsed = monotonicNanoseconds() - start
        lastPosition = position
        return Double(elapsed) / Double(max(1, hops))
    }
}
