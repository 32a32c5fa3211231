import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Recovery of a whole cluster restarted from its region files (every node process was killed,
/// at any moment), before any node serves: FaRM's transaction-state recovery (section 5.3) with
/// every log at hand, so that no vote needs a message.
///
/// The logs are the nodes' mailbox rings: a receiver keeps each LOCK, COMMIT-PRIMARY and
/// COMMIT-BACKUP record in its ring until TRUNCATE (or ABORT) releases it, and a record is in the
/// ring once the coordinator's write of it completed. So after a crash:
/// 1. **Read the logs**: every record no receiver released, from every ring of every node.
/// 2. **Decide** each transaction found: it may have been reported committed only if every backup
///    received its COMMIT-BACKUP (and one primary its COMMIT-PRIMARY); a coordinator sends ABORT
///    after COMMIT-BACKUP began only to undo it, to the backups first. So a transaction **commits**
///    if some COMMIT-BACKUP, COMMIT-PRIMARY or TRUNCATE of it survives and no ABORT does (FaRM's
///    rule with every region's vote known), and **aborts** otherwise.
/// 3. **Release every lock**: a lock is only ever held by a transaction whose LOCK record is
///    still in the primary's log, so clearing the lock bit of every object those records name
///    releases them all (an aborted transaction never changed an object's bytes).
/// 4. **Roll forward** the committed transactions on every replica: the entries of their LOCK
///    records (the primaries' new values) go to each replica of the region, those of their
///    COMMIT-BACKUP records to that backup. Newest version wins, so what a primary or backup had
///    already installed is left alone: replicas end level.
/// 5. **Clear the logs** (the rings) so that senders start afresh.
/// Allocators are rebuilt afterwards, from the slab tables and headers, when the engines start.
public enum RestartRecovery {
    /// One node's files as recovery reads them.
    package struct NodeFiles {
        package let node: NodeID
        package let mailbox: Mailbox
        package let replicas: [Region]

        package init(node: NodeID, mailbox: Mailbox, replicas: [Region]) {
            self.node = node
            self.mailbox = mailbox
            self.replicas = replicas
        }
    }

    /// What recovery found and did.
    public struct Report: Sendable, CustomStringConvertible {
        /// Records read from the logs (not released before the crash).
        public var records = 0
        /// Records that were not Granary records of this configuration or of one with its routing
        /// (ignored, counted).
        public var refused = 0
        /// Transactions found in the logs that commit (some COMMIT-BACKUP, COMMIT-PRIMARY or
        /// TRUNCATE of theirs survived, and no ABORT): rolled forward on every replica.
        public var committed = 0
        /// Transactions found in the logs that abort (no evidence of a commit, or an ABORT): their
        /// locks released, their writes never installed.
        public var aborted = 0
        /// Lock bits cleared.
        public var locksReleased = 0
        /// Entries installed on some replica (those already there are not counted).
        public var entriesInstalled = 0
        /// How long recovery took, in nanoseconds (reading the logs to clearing them).
        public var nanoseconds: UInt64 = 0

        /// The counts and the time in one line, as restart recovery logs them.
        public var description: String {
            "restart recovery: \(records) log records (\(refused) refused), \(committed) transactions rolled forward, \(aborted) rolled back, \(locksReleased) locks released, \(entriesInstalled) entries installed, in \(nanoseconds / 1_000) us"
        }
    }

    private struct KeptRecord {
        let node: NodeID
        let bytes: [UInt8]
    }

    /// Recovers the transactions in the logs of `nodes` (every member of `configuration`), then
    /// clears the logs. Call before any engine starts on these files.
    package static func recover(configuration: Configuration, nodes: [NodeFiles], logger: Logger? = nil) -> Report {
        let start = monotonicNanoseconds()
        var report = Report()
        var locks: [TransactionID: [KeptRecord]] = [:]
        var backups: [TransactionID: [KeptRecord]] = [:]
        var commitEvidence = Set<TransactionID>()
        var aborts = Set<TransactionID>()
        // 1. Read the logs: records of this configuration, or of an earlier one with its routing
        // (regions added on demand change the id, not where records go).
        let oldest = configuration.routingEpoch ?? configuration.id
        for files in nodes {
            for member in configuration.members {
                Mailbox.keptMessages(in: files.mailbox.region, ringCapacity: files.mailbox.ringCapacity, from: member.node) { _, bytes in
                    report.records += 1
                    guard let record = try? RecordView(bytes), record.configuration >= oldest, record.configuration <= configuration.id else {
                        report.refused += 1
                        return
                    }
                    switch record.kind {
                    case .lock: locks[record.transaction, default: []].append(KeptRecord(node: files.node, bytes: Array(bytes)))
                    case .commitBackup:
                        backups[record.transaction, default: []].append(KeptRecord(node: files.node, bytes: Array(bytes)))
                        commitEvidence.insert(record.transaction)
                    case .commitPrimary: commitEvidence.insert(record.transaction)
                    case .abort: aborts.insert(record.transaction)
                    case .truncate: try? record.forEachTransactionID { commitEvidence.insert($0) }
                    case .lockReply, .allocate, .allocateReply, .allocateRelease: break
                    }
                }
            }
        }
        let replicas = Dictionary(nodes.map { ($0.node, $0) }, uniquingKeysWith: { first, _ in first })
        func replica(of region: RegionID, on node: NodeID) -> Region? {
            replicas[node]?.replicas.first { $0.id == region }
        }
        // 3. Release every lock the logs' LOCK records may hold.
        for (_, records) in locks {
            for kept in records {
                kept.bytes.withUnsafeBytes { bytes in
                    guard let record = try? RecordView(bytes) else { return }
                    try? record.forEachEntry { entry in
                        guard let region = replica(of: entry.address.region, on: kept.node) else { return }
                        let layout = SlabLayout(regionSize: region.size, slabShift: region.slabShift)
                        let offset = Int(entry.address.offset)
                        guard offset >= layout.firstSlabOffset, offset % ObjectLayout.lineSize == 0,
                              offset + ObjectLayout.lineSize <= region.size else { return }
                        let header = ObjectLayout.loadHeader(region.base + offset)
                        if header.isLocked {
                            ObjectLayout.unlock(region.base + offset, restoring: header)
                            report.locksReleased += 1
                        }
                    }
                }
            }
        }
        // 2 and 4. Decide, and roll the committed transactions forward everywhere.
        let transactions = Set(locks.keys).union(backups.keys).union(commitEvidence).union(aborts)
        let committed = transactions.filter { commitEvidence.contains($0) && !aborts.contains($0) }
        report.committed = committed.count
        report.aborted = transactions.count - committed.count
        // Twice: an entry whose slab reaches a replica only with another transaction's allocation
        // (applied later in the first pass) is applied in the second; the rest are already there.
        for _ in 0..<2 {
            for id in committed {
                for kept in locks[id] ?? [] {
                    // A LOCK record holds the new values of every object of its primary: every replica.
                    apply(kept, configuration: configuration, everyReplica: true, replica: replica, report: &report)
                }
                for kept in backups[id] ?? [] {
                    apply(kept, configuration: configuration, everyReplica: false, replica: replica, report: &report)
                }
            }
        }
        // 5. Clear the logs.
        for files in nodes { files.mailbox.resetRings() }
        report.nanoseconds = monotonicNanoseconds() - start
        if report.records > 0 { logger?.notice("\(report)") }
        return report
    }

    private static func apply(_ kept: KeptRecord, configuration: Configuration, everyReplica: Bool,
                              replica: (RegionID, NodeID) -> Region?, report: inout Report) {
        kept.bytes.withUnsafeBytes { bytes in
            guard let record = try? RecordView(bytes) else { return }
            try? record.forEachEntry { entry in
                let targets = everyReplica ? (configuration.placement(of: entry.address.region)?.replicas ?? []) : [kept.node]
                for node in targets {
                    guard let region = replica(entry.address.region, node) else { continue }
                    let layout = SlabLayout(regionSize: region.size, slabShift: region.slabShift)
                    let before = ObjectLayout.loadHeader(region.base + min(Int(entry.address.offset), region.size - ObjectLayout.lineSize))
                    let backupEntry = RecordProcessor.BackupEntry(address: entry.address, new: entry.new, lines: entry.lines,
                                                                  operation: entry.operation, payload: entry.payload)
                    _ = RecordProcessor.apply(backupEntry, at: region.base, layout: layout)
                    let after = ObjectLayout.loadHeader(region.base + min(Int(entry.address.offset), region.size - ObjectLayout.lineSize))
                    if after != before { report.entriesInstalled += 1 }
                }
            }
        }
    }
}
