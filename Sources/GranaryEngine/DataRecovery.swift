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
/// The copy goes slab by slab, each slab one one-sided read of the primary's bytes, paced so that
/// foreground transactions keep their throughput: after each slab a random wait of up to twice
/// the longer of `pace` and ``copyIdleFactor`` times the slab's own work, so that a copy takes at
/// most about a twentieth of a core whatever its objects' size (with `pace` alone, a slab whose
/// installs take as long as the pace, many small objects or a slow host, would take half a core).
/// The slab table comes first (the size class of every slab carved so far). Each object of a slab
/// is installed only if the primary's copy is whole (every line at the header's version, not
/// locked) and newer than the backup's: records applied meanwhile carry newer versions and win,
/// whichever comes first. An object locked or torn in the slab's read is read again on its own
/// until it is whole. Installs run under the engine's backup-apply claim, which every install
/// into a backup replica takes (a lane's TRUNCATE, recovery applying its decisions), so none
/// applies to an object while the copy writes it; the node's record processing (LOCK answers
/// above all) never waits for the copy. (Under the mailbox's poll claim, every lane's, the copy
/// held back the copying node's record processing while it waited for the lanes coordinators
/// held.)
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
    /// Data recovery's pacing: after each slab, a copy waits at least this many times as long as the
    /// slab took (on average: the wait is random, up to twice that): at most about 5% of a core.
    package static let copyIdleFactor: UInt64 = 19

    /// Copies this node's backup replica of `region` from `primary` (data recovery), pacing each slab
    /// by a random wait of up to twice the longer of `pace` and ``copyIdleFactor`` times its work
    /// (no wait when `pace` is zero). Stops early, with an error, if `shouldStop` says so
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
        /// A lock found on this backup is stale: on a backup only installs take locks (truncation,
        /// recovery's decisions, this copy), each under the backup-apply claim, which the copy
        /// holds here (and a replica still copying is never promoted to primary, whose LOCKs and
        /// lock recovery take locks too), so a locked header is an install cut short by a crash of an
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
            let slabStart = monotonicNanoseconds()
            let base = slab << layout.slabShift
            let objectBytes = lines * ObjectLayout.lineSize
            try read(base, into: buffer)
            var again: [Int] = []
            var offset = 0
            while offset + objectBytes <= layout.slabSize {
                // 64 objects per hold of the claim: a TRUNCATE's installs wait for the copy only
                // that long.
                withBackupApplyClaim {
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
                    if withBackupApplyClaim({ install(one.baseAddress!, at: offset, lines: lines) }) { break }
                    attempts += 1
                    try await Task.sleep(for: .microseconds(attempts < 10 ? 20 : 500))
                }
            }
            if pace > .zero {
                let work = (monotonicNanoseconds() - slabStart) &* Self.copyIdleFactor
                let wait = max(pace.wholeNanoseconds, work)
                try await Task.sleep(for: .nanoseconds(Int64(Double(wait) * Double.random(in: 0...2))))
            }
        }
        report.nanoseconds = monotonicNanoseconds() - start
        return report
    }
}
