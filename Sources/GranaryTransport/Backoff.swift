#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Exponential back-off for pollers and waiters: spin a little, then yield the CPU, then sleep up
/// to ``maximumSleepMicroseconds``. On a machine with fewer cores than busy nodes, an idle poller
/// must get out of the way of the ones with work.
public struct Backoff: Sendable {
    /// The longest sleep of one pause, in microseconds.
    public var maximumSleepMicroseconds: UInt32
    private let spins: UInt32
    private let yields: UInt32
    private var step: UInt32 = 0

    /// A back-off at its first step.
    ///
    /// - Parameters:
    ///   - spins: pauses that return at once (the awaited write usually lands within a few hundred cycles);
    ///   - yields: pauses that then yield the CPU;
    ///   - maximumSleepMicroseconds: the cap of the sleeps that follow, doubling from 1 us.
    public init(spins: UInt32 = 16, yields: UInt32 = 8, maximumSleepMicroseconds: UInt32 = 1_000) {
        self.spins = spins
        self.yields = yields
        self.maximumSleepMicroseconds = maximumSleepMicroseconds
    }

    /// Waits a little longer than last time.
    public mutating func pause() {
        let sleep = advance()
        if sleep > 0 {
            usleep(sleep)
        } else if step > spins {
            sched_yield()
        }
    }

    /// Moves to the next step and returns its sleep in microseconds (0 for a spin or a yield):
    /// 2, 4, 8 ... after the spins and yields, capped at ``maximumSleepMicroseconds`` whatever it is.
    mutating func advance() -> UInt32 {
        if step < UInt32.max { step += 1 }
        guard step > spins + yields else { return 0 }
        return min(maximumSleepMicroseconds, UInt32(1) << min(step - spins - yields, 31))
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

/// Granary's additions to the standard library's `Duration`.
extension Duration {
    /// The duration in whole nanoseconds, for comparing with ``monotonicNanoseconds()``; a
    /// negative duration is 0.
    @inlinable public var wholeNanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0, attoseconds >= 0 else { return 0 }
        return UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)
    }
}
