import GranaryConfiguration
import GranaryMemory
import GranaryTransport
#if canImport(Glibc)
import Glibc
#endif

/// FaRM's data recovery (SOSP'15, section 5.4): a region left with fewer replicas than the cluster
/// keeps gets a new backup, which copies the region from its primary in the background while it
/// already receives and applies the region's COMMIT-BACKUP records like any backup.
///
/// The copy goes slab by slab, each slab one one-sided read of the primary's bytes, paced (a random
/// wait of up to twice `pace` after each) so that foreground transactions keep their throughput.
/// The slab table comes first (the size class of every slab carved so far). Each object of a slab
/// is installed only if the primary's copy is whole (every line at the header's version, not
/// locked) and newer than the backup's: records applied meanwhile carry newer versions and win,
/// whichever comes first. An object locked or torn in the slab's read is read again on its own
/// until it is whole. Installs run under the mailbox's poll claim (every lane), so a
/// truncation never applies to an object while the copy writes it.
///
/// Why nothing is missed: the configuration that added this backup was applied by every member
/// only after transaction recovery resolved every transaction of the one before, so the primary's
/// bytes hold all of those; every transaction since sends this backup its records.
package struct DataRecoveryReport: Sendable, CustomStringConvertible {
    package var region: RegionID
    package var bytesRead = 0
    package var objectsInstalled = 0
    package var objectsReread = 0
    /// Objects of the backup found locked by an install a crash cut short, replaced.
    package var staleLocksReplaced = 0
    package var nanoseconds: UInt64 = 0

    package var description: String {
        "copied \(region): \(bytesRead >> 10) KiB read, \(objectsInstalled) objects installed, \(objectsReread) read again, \(staleLocksReplaced) stale locks replaced, in \(nanoseconds / 1_000_000) ms"
    }
}

extension Engine {
    /// Copies this node's backup replica of `region` from `primary` (data recovery), pacing each slab
    /// by a random wait of up to twice `pace`. Stops early, with an error, if `shouldStop` says so
    /// (the configuration moved on) or this node stops.
    package func copyRegion(_ region: RegionID, from primary: NodeID, pace: Duration,
                           shouldStop: @Sendable () -> Bool = { false }) async throws -> DataRecoveryReport {
        let start = monotonicNanoseconds()
        var report = DataRecoveryReport(region: region)
        guard let local = view.localReplica(region), local.allocator == nil else {
            throw RecoveryError(description: "\(node) holds no backup replica of \(region) to copy into")
        }
        let replica = local.region
        let layout = local.layout
        func check() throws {
            guard running.load(ordering: .relaxed), !shouldStop() else {
                throw RecoveryError(description: "the copy of \(region) from \(primary) to \(node) stopped: the node stopped or the configuration moved on")
            }
        }
        func read(_ offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
            do {
                try faults.check(.copyRead, primary)
                try transport.read(from: primary, GlobalAddress(region: region, offset: UInt32(offset)), into: buffer)
            } catch {
                throw RecoveryError(description: "reading \(buffer.count) bytes of \(region) at \(offset) from its primary \(primary) failed: \(error)")
            }
            report.bytesRead += buffer.count
        }
        // The slab table.
        let tableBytes = layout.slabCount * 2
        let table = UnsafeMutableRawBufferPointer.allocate(byteCount: tableBytes, alignment: 8)
        defer { table.deallocate() }
        try read(SlabLayout.tableOffset, into: table)
        mailbox.withPoller { _ in
            for slab in 0..<layout.slabCount {
                let lines = Int(table.load(fromByteOffset: slab * 2, as: UInt16.self))
                guard lines > 0, slab << layout.slabShift >= layout.firstSlabOffset else { continue }
                _ = SlabAllocator.recordSlabClass(at: replica.base, layout: layout, slot: ObjectSlot(offset: slab << layout.slabShift, lines: lines))
            }
            // Truncated entries that waited for one of these slabs apply now.
            for index in 0..<NodeID.limit { lanes[index].takeUnretainedValue().retryDeferred(view: view) }
            mailbox.advanceReleased()
        }
        // The slabs.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.slabSize, alignment: 64)
        defer { buffer.deallocate() }
        let payload = UnsafeMutableRawPointer.allocate(byteCount: layout.slabSize, alignment: 8)
        defer { payload.deallocate() }
        /// Installs the object in `snapshot` if whole and newer; false if it must be read again.
        ///
        /// A lock found on this backup is stale: on a backup only installs take locks (record
        /// processing, truncation, this copy), each under a lane's claim, and the copy holds every
        /// lane here (the poll claim), so a locked header is an install cut short by a crash of an
        /// earlier life of this node (the lock taken, the payload partly written, the header never
        /// published). Such an object is
        /// torn at its header's version, so the primary's whole copy replaces it even at the same
        /// version. (Taking the lock for a live one made this copy read the object again for ever:
        /// a region stayed marked copying after a restart, seen in the crash-restart test.)
        func install(_ snapshot: UnsafeRawPointer, at offset: Int, lines: Int) -> Bool {
            guard case .consistent(let header) = ObjectLayout.check(snapshot: snapshot, lines: lines) else { return false }
            let object = replica.base + offset
            let current = ObjectLayout.loadHeader(object)
            if current.isLocked {
                guard header.version >= current.version else {
                    // Cut short while installing something newer than this read of the
                    // primary: nothing here to replace it with; a later read (or the record's
                    // replay) has it.
                    return false
                }
                report.staleLocksReplaced += 1
            } else {
                guard header.version > current.version else { return true }
                guard ObjectLayout.tryLock(object, expected: current).locked else { return false }
            }
            let count = ObjectLayout.payloadCapacity(lines: lines)
            ObjectLayout.gatherPayload(from: snapshot, into: payload, count: count)
            ObjectLayout.install(object, lines: lines, payload: payload, count: count, header: header)
            report.objectsInstalled += 1
            return true
        }
        for slab in (layout.firstSlabOffset >> layout.slabShift)..<layout.slabCount {
            let lines = Int(table.load(fromByteOffset: slab * 2, as: UInt16.self))
            guard lines > 0 else { continue }
            try check()
            let base = slab << layout.slabShift
            let objectBytes = lines * ObjectLayout.lineSize
            try read(base, into: buffer)
            var again: [Int] = []
            var offset = 0
            while offset + objectBytes <= layout.slabSize {
                // 64 objects per hold of the poll claim: the node's record processing (LOCK
                // answers above all) waits for the copy only that long.
                mailbox.withPoller { _ in
                    var count = 0
                    while count < 64, offset + objectBytes <= layout.slabSize {
                        if !install(buffer.baseAddress! + offset, at: base + offset, lines: lines) { again.append(base + offset) }
                        offset += objectBytes
                        count += 1
                    }
                }
            }
            for offset in again {
                var attempts = 0
                while true {
                    try check()
                    let one = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<objectBytes])
                    try read(offset, into: one)
                    report.objectsReread += 1
                    if mailbox.withPoller({ _ in install(one.baseAddress!, at: offset, lines: lines) }) { break }
                    attempts += 1
                    try await Task.sleep(for: .microseconds(attempts < 10 ? 20 : 500))
                }
            }
            if pace > .zero { try await Task.sleep(for: pace * Double.random(in: 0...2)) }
        }
        report.nanoseconds = monotonicNanoseconds() - start
        return report
    }
}
