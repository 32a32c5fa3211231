#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Exponential back-off for pollers and waiters: spin a little, then yield the CPU, then sleep up
/// to ``maximumSleepMicroseconds``. On a machine with fewer cores than busy nodes, an idle poller
/// must get out of the way of the ones with work.
public struct Backoff: Sendable {
    public var maximumSleepMicroseconds: UInt32
    private var step: UInt32 = 0

    public init(maximumSleepMicroseconds: UInt32 = 1_000) {
        self.maximumSleepMicroseconds = maximumSleepMicroseconds
    }

    /// Waits a little longer than last time.
    public mutating func pause() {
        step &+= 1
        if step <= 16 {
            // Spin: the common case is that the awaited write lands within a few hundred cycles.
            return
        } else if step <= 24 {
            sched_yield()
        } else {
            let exponent = min(step - 24, 10)
            usleep(min(maximumSleepMicroseconds, UInt32(1) << exponent))
        }
    }

    /// Starts over after progress.
    public mutating func reset() { step = 0 }
}

/// Monotonic nanoseconds, for deadlines and latency timers.
@inlinable public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
