import CPMem

/// Hints to the CPU about region memory this thread will touch soon.
///
/// A prefetch starts bringing a line into this core's cache and returns at once: the caller goes
/// on while the miss is served, and several prefetched lines are fetched at the same time instead
/// of one after another. It is only a hint: it never faults (an unmapped address is ignored) and
/// changes no value anyone reads.
public enum CacheLines {
    /// Starts fetching the line that holds `address`.
    @inlinable @inline(__always)
    public static func prefetch(_ address: UnsafeRawPointer) {
        granary_prefetch(address)
    }

    /// Starts fetching every line of the `count` bytes at `start`.
    @inlinable @inline(__always)
    public static func prefetch(_ start: UnsafeRawPointer, count: Int) {
        guard count > 0 else { return }
        var line = UInt(bitPattern: start) & ~UInt(ObjectLayout.lineSize - 1)
        let end = UInt(bitPattern: start) &+ UInt(count)
        while line < end {
            granary_prefetch(UnsafeRawPointer(bitPattern: line))
            line &+= UInt(ObjectLayout.lineSize)
        }
    }
}
