import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An object's header word: the first 8 bytes of its first cache line.
///
/// ```
/// bit  63      lock        set by the primary's CPU (compare-and-swap) during LOCK .. COMMIT-PRIMARY
/// bit  62      allocated   the slot holds a live object
/// bits 48..61  incarnation bumped every time the slot is freed, so a read of a freed or reused
///                          slot is told apart from a read of the object the reader meant
/// bits 0..47   version     bumped by every committed write
/// ```
/// Every further cache line of the object starts with a copy of the header without the lock bit
/// (its *line version*), so one read of the whole object can be checked for tearing.
public struct ObjectHeader: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The header word as stored.
    public var rawValue: UInt64

    /// Bit 63: the object is locked by a committing transaction.
    public static let lockBit: UInt64 = 1 << 63
    /// Bit 62: the slot holds a live object.
    public static let allocatedBit: UInt64 = 1 << 62
    /// Where the incarnation starts in the word (bit 48).
    public static let incarnationShift: UInt64 = 48
    /// The incarnation's 14 bits, once shifted down by ``incarnationShift``.
    public static let incarnationMask: UInt64 = 0x3FFF
    /// The version's 48 bits (bits 0..47).
    public static let versionMask: UInt64 = (1 << 48) - 1

    /// The header whose word is `rawValue`.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// A header of the given fields; `version` keeps its low 48 bits, `incarnation` its low 14.
    ///
    /// - Parameters:
    ///   - version: the object's version.
    ///   - incarnation: the slot's incarnation.
    ///   - allocated: whether the slot holds a live object.
    ///   - locked: whether the lock bit is set.
    @inlinable public init(version: UInt64, incarnation: UInt16, allocated: Bool, locked: Bool = false) {
        rawValue = (version & Self.versionMask)
            | (UInt64(incarnation) & Self.incarnationMask) << Self.incarnationShift
            | (allocated ? Self.allocatedBit : 0) | (locked ? Self.lockBit : 0)
    }

    /// Whether the object is locked: by a committing transaction from its LOCK until its
    /// COMMIT-PRIMARY or ABORT, or by recovery until it decides.
    @inlinable public var isLocked: Bool { rawValue & Self.lockBit != 0 }
    /// Whether the slot holds a live object.
    @inlinable public var isAllocated: Bool { rawValue & Self.allocatedBit != 0 }
    /// How many times the slot has been freed (modulo 2^14).
    @inlinable public var incarnation: UInt16 { UInt16(truncatingIfNeeded: (rawValue >> Self.incarnationShift) & Self.incarnationMask) }
    /// The object's version: bumped by every committed write, allocation and free.
    @inlinable public var version: UInt64 { rawValue & Self.versionMask }

    /// This header with the lock bit set.
    @inlinable public var locked: ObjectHeader { ObjectHeader(rawValue: rawValue | Self.lockBit) }
    /// This header with the lock bit clear.
    @inlinable public var unlocked: ObjectHeader { ObjectHeader(rawValue: rawValue & ~Self.lockBit) }

    /// The header after a committed write: next version, unlocked.
    @inlinable public var nextVersion: ObjectHeader {
        ObjectHeader(version: version &+ 1, incarnation: incarnation, allocated: isAllocated)
    }

    /// The header of a slot that was just allocated: allocated, next version, same incarnation.
    @inlinable public var allocating: ObjectHeader {
        ObjectHeader(version: version &+ 1, incarnation: incarnation, allocated: true)
    }

    /// The header of a slot that was just freed: not allocated, next incarnation and version.
    @inlinable public var freeing: ObjectHeader {
        ObjectHeader(version: version &+ 1, incarnation: incarnation &+ 1, allocated: false)
    }

    /// The version, the incarnation and the flags set, e.g. `v7/i2 locked`.
    public var description: String {
        "v\(version)/i\(incarnation)\(isAllocated ? "" : " free")\(isLocked ? " locked" : "")"
    }
}

/// What a one-sided read of a whole object tells the reader.
public enum ObjectReadCheck: Equatable, Sendable {
    /// Every line carries the header's version and the header is unlocked: the bytes are one
    /// committed state of the object.
    case consistent(ObjectHeader)
    /// The object is locked by a committing transaction; read again later.
    case locked(ObjectHeader)
    /// The line at this index carries another version than the header: the read overlapped a write.
    case torn(line: Int)
}

/// FaRM's object layout: a header word, then the payload spread over cache lines, each line
/// starting with a version word.
///
/// Lines are ``lineSize`` bytes; each carries ``payloadPerLine`` payload bytes after its 8-byte
/// version word (the header word for line 0).
public enum ObjectLayout {
    /// Bytes in a cache line: 64.
    public static let lineSize = 64
    /// 8-byte words in a cache line: 8.
    public static let wordsPerLine = 8
    /// Payload bytes in a cache line, after its 8-byte version word: 56.
    public static let payloadPerLine = 56

    /// Cache lines needed for `payloadBytes` bytes of payload (at least one).
    @inlinable public static func lines(forPayload payloadBytes: Int) -> Int {
        max(1, (payloadBytes + payloadPerLine - 1) / payloadPerLine)
    }

    /// Payload bytes that fit in `lines` cache lines.
    @inlinable public static func payloadCapacity(lines: Int) -> Int { lines * payloadPerLine }

    @inlinable static func word(_ base: UnsafeRawPointer, _ index: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        UnsafeMutableRawPointer(mutating: base + index * 8).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// The header word of the object at `object`, loaded with acquire ordering.
    @inlinable public static func loadHeader(_ object: UnsafeRawPointer) -> ObjectHeader {
        ObjectHeader(rawValue: word(object, 0).pointee.load(ordering: .acquiring))
    }

    /// Checks a snapshot of `lines` whole lines of an object (one read of all of it).
    @inlinable
    public static func check(snapshot: UnsafeRawPointer, lines: Int) -> ObjectReadCheck {
        let header = ObjectHeader(rawValue: snapshot.loadUnaligned(as: UInt64.self))
        if header.isLocked { return .locked(header) }
        var line = 1
        while line < lines {
            if snapshot.loadUnaligned(fromByteOffset: line * lineSize, as: UInt64.self) != header.rawValue {
                return .torn(line: line)
            }
            line += 1
        }
        return .consistent(header)
    }

    /// Copies `count` payload bytes out of a snapshot (or an object), skipping version words.
    @inlinable
    public static func gatherPayload(from object: UnsafeRawPointer, into destination: UnsafeMutableRawPointer, count: Int) {
        var copied = 0
        var line = 0
        while copied < count {
            let chunk = min(payloadPerLine, count - copied)
            (destination + copied).copyMemory(from: object + line * lineSize + 8, byteCount: chunk)
            copied += chunk
            line += 1
        }
    }

    /// Tries to take the lock of the object at `object`, expecting it unlocked at `expected`.
    ///
    /// This is the primary CPU's compare-and-swap in FaRM's LOCK phase.
    /// - Returns: the header found (unchanged on success).
    @inlinable
    public static func tryLock(_ object: UnsafeMutableRawPointer, expected: ObjectHeader) -> (locked: Bool, found: ObjectHeader) {
        let (exchanged, original) = word(object, 0).pointee.compareExchange(
            expected: expected.unlocked.rawValue, desired: expected.unlocked.locked.rawValue,
            successOrdering: .acquiringAndReleasing, failureOrdering: .acquiring)
        return (exchanged, ObjectHeader(rawValue: original))
    }

    /// Releases a lock taken with ``tryLock(_:expected:)`` without changing the object (ABORT).
    @inlinable
    public static func unlock(_ object: UnsafeMutableRawPointer, restoring header: ObjectHeader) {
        word(object, 0).pointee.store(header.unlocked.rawValue, ordering: .releasing)
    }

    /// Writes a new state of a locked object and publishes `header` (unlocked) last.
    ///
    /// The caller holds the object's lock (its header word has the lock bit). Each further line is
    /// written as a per-line sequence lock: its version word is first set to a busy value (the new
    /// version with the lock bit), then the payload words, then the new version with release
    /// ordering. A concurrent reader that copies lines with ``copyLines(from:to:lines:)`` therefore
    /// sees each line whole, as an RDMA NIC's DMA read would, and ``check(snapshot:lines:)`` sees
    /// any mix of versions.
    ///
    /// - Parameters:
    ///   - object: the object's first line (its header line).
    ///   - lines: the object's size in cache lines.
    ///   - payload: `count` bytes; the rest of the last line is zero-filled.
    ///   - count: the payload's length in bytes, at most ``payloadCapacity(lines:)``.
    ///   - header: the header to publish; its line versions are `header.unlocked`.
    public static func install(_ object: UnsafeMutableRawPointer, lines: Int, payload: UnsafeRawPointer, count: Int,
                               header: ObjectHeader) {
        precondition(count <= payloadCapacity(lines: lines), "payload of \(count) bytes exceeds \(lines) lines")
        let newHeader = header.unlocked
        let busy = newHeader.locked.rawValue
        // Line 0's sequence word is the header, which the caller already locked.
        atomicMemoryFence(ordering: .releasing)
        var offset = 0
        for line in 0..<lines {
            let lineBase = object + line * lineSize
            if line > 0 {
                word(lineBase, 0).pointee.store(busy, ordering: .relaxed)
                atomicMemoryFence(ordering: .releasing)
            }
            for slot in 1..<wordsPerLine {
                let value: UInt64
                if offset + 8 <= count {
                    value = (payload + offset).loadUnaligned(as: UInt64.self)
                } else {
                    var partial: UInt64 = 0
                    var byte = 0
                    while offset + byte < count, byte < 8 {
                        partial |= UInt64((payload + offset + byte).load(as: UInt8.self)) << (8 * UInt64(byte))
                        byte += 1
                    }
                    value = partial
                }
                word(lineBase, slot).pointee.store(value, ordering: .relaxed)
                offset += 8
            }
            if line > 0 {
                word(lineBase, 0).pointee.store(newHeader.rawValue, ordering: .releasing)
            }
        }
        word(object, 0).pointee.store(newHeader.rawValue, ordering: .releasing)
    }

    /// Sets the header (and every line version) of an unlocked slot, leaving the payload alone:
    /// used to free a slot and to format new slabs. The caller owns the slot exclusively.
    public static func stamp(_ object: UnsafeMutableRawPointer, lines: Int, header: ObjectHeader) {
        for line in 1..<max(1, lines) {
            word(object + line * lineSize, 0).pointee.store(header.unlocked.rawValue, ordering: .relaxed)
        }
        word(object, 0).pointee.store(header.rawValue, ordering: .releasing)
    }

    /// Copies `lines` whole cache lines so that each line is read as a unit.
    ///
    /// Each line is a per-line sequence lock on its first word (see ``install(_:lines:payload:count:header:)``).
    /// The first word of every line is loaded (acquire), then the lines are copied, then after an
    /// acquire fence every first word is loaded again; a line whose first word changed meanwhile
    /// overlapped a writer and is copied again on its own. This gives a CPU copy the cache-line
    /// atomicity an RDMA NIC's DMA read has, which is what lets ``check(snapshot:lines:)`` detect every
    /// torn read. A line that keeps changing is marked busy (lock bit) in the copy after a bounded
    /// number of attempts, so the check rejects it.
    ///
    /// The bulk copy is a plain `memcpy` racing with writers, as in every seqlock reader; the
    /// versions loaded around it, not the copied bytes, decide whether a line is used.
    /// Both pointers must be 8-byte aligned.
    @inlinable
    public static func copyLines(from source: UnsafeRawPointer, to destination: UnsafeMutableRawPointer, lines: Int) {
        if lines == 1 {
            copyLineStable(from: source, to: destination)
            return
        }
        if lines <= 8 {
            // Small objects (the common case): the versions live in a stack tuple.
            var versions: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
            withUnsafeMutableBytes(of: &versions) { raw in
                copyChunk(from: source, to: destination, lines: lines, versions: raw.baseAddress!.assumingMemoryBound(to: UInt64.self))
            }
            return
        }
        if lines <= 16 {
            var versions: ((UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64),
                           (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)) =
                ((0, 0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0, 0))
            withUnsafeMutableBytes(of: &versions) { raw in
                copyChunk(from: source, to: destination, lines: lines, versions: raw.baseAddress!.assumingMemoryBound(to: UInt64.self))
            }
            return
        }
        let chunk = 32
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: chunk) { versions in
            var first = 0
            while first < lines {
                let count = min(chunk, lines - first)
                copyChunk(from: source + first * lineSize, to: destination + first * lineSize, lines: count,
                          versions: versions.baseAddress!)
                first += count
            }
        }
    }

    /// Copies the first `lines` lines of ONE object (its header line first; a prefix of the object
    /// is fine), so that the copy is one state of the object or is rejected by
    /// ``check(snapshot:lines:)``.
    ///
    /// The object's header serves as a sequence lock over all its lines: load the header (acquire),
    /// copy, then (after an acquire fence) load every line's first word again. If the header was
    /// unlocked at some value `h` and every line's first word is `h` afterwards, the copy is the
    /// state `h`:
    /// - while the header is unlocked at `h`, every line is at `h` (``install(_:lines:payload:count:header:)``
    ///   and ``stamp(_:lines:header:)`` store the lines before they publish the header);
    /// - a line's first word changes before and after every store to its payload and never returns
    ///   to an earlier value (versions and incarnations only grow; the busy value carries the next
    ///   version), and the header returns to `h` only when an ABORT releases a lock without
    ///   having written;
    /// - so a line whose first word is `h` before and after the copy had no payload store between.
    ///
    /// This needs one load per line after the copy instead of ``copyLines(from:to:lines:)``'s one
    /// before and one after, which is what the latter falls back to when a line changed or the
    /// header is locked. It is NOT valid for lines of several objects: another object's lines can
    /// reach the same header value during the copy.
    /// Both pointers must be 8-byte aligned.
    @inlinable
    public static func copyObject(from source: UnsafeRawPointer, to destination: UnsafeMutableRawPointer, lines: Int) {
        copyObject(from: source, to: destination, lines: lines) { memcpy($0, $1, $2) }
    }

    /// ``copyObject(from:to:lines:)`` with the bulk copy given (tests interleave a writer with it).
    @inlinable @inline(__always)
    static func copyObject(from source: UnsafeRawPointer, to destination: UnsafeMutableRawPointer, lines: Int,
                           copy: (UnsafeMutableRawPointer, UnsafeRawPointer, Int) -> Void) {
        let header = word(source, 0).pointee.load(ordering: .acquiring)
        if header & ObjectHeader.lockBit == 0 {
            copy(destination, source, lines * lineSize)
            atomicMemoryFence(ordering: .acquiring)
            var line = 0
            while line < lines, word(source + line * lineSize, 0).pointee.load(ordering: .relaxed) == header {
                line += 1
            }
            if line == lines { return }
        }
        copyLines(from: source, to: destination, lines: lines)
    }

    /// One pass of ``copyLines(from:to:lines:)`` over `lines` lines, `versions` holding one word per line.
    @inlinable
    static func copyChunk(from: UnsafeRawPointer, to: UnsafeMutableRawPointer, lines: Int, versions: UnsafeMutablePointer<UInt64>) {
        for line in 0..<lines {
            versions[line] = word(from + line * lineSize, 0).pointee.load(ordering: .acquiring)
        }
        memcpy(to, from, lines * lineSize)
        atomicMemoryFence(ordering: .acquiring)
        for line in 0..<lines {
            // Unchanged across the copy: versions only grow, so the copied first word is this same
            // value and the line's bytes are one state of it.
            if word(from + line * lineSize, 0).pointee.load(ordering: .relaxed) != versions[line] {
                copyLineStable(from: from + line * lineSize, to: to + line * lineSize)
            }
        }
    }

    /// Copies one line under its sequence lock, retrying while a writer is on it.
    @inlinable
    static func copyLineStable(from: UnsafeRawPointer, to: UnsafeMutableRawPointer) {
        var attempts = 0
        while true {
            let first = word(from, 0).pointee.load(ordering: .acquiring)
            memcpy(to + 8, from + 8, lineSize - 8)
            atomicMemoryFence(ordering: .acquiring)
            let again = word(from, 0).pointee.load(ordering: .relaxed)
            if first == again {
                to.storeBytes(of: first, as: UInt64.self)
                return
            }
            attempts += 1
            if attempts == 64 {
                to.storeBytes(of: again | ObjectHeader.lockBit, as: UInt64.self)
                return
            }
        }
    }
}
