import GranaryConfiguration
import GranaryMemory
import Synchronization

/// The records a coordinator still owes after a failed send, in the order that keeps the
/// outcome exact, retried until delivered (FaRM's coordinator keeps trying; recovery takes over
/// if it dies first).
///
/// - An undo (a commit that failed while COMMIT-BACKUP records went out): ABORT to the backups
///   that hold a record first, and only once every one of them has it, ABORT to the primaries.
///   Until then the primaries keep their locks and LOCK records, so that recovery, if it runs
///   first, finds a transaction it can roll forward whole (and not a backup's half).
/// - An abort: ABORT to primaries that may hold locks.
/// - A commit: COMMIT-PRIMARY to the primaries that have not had it; the transaction's TRUNCATE
///   (to every node) is queued only after the last is delivered, so that no record that proves
///   the commit is released before every primary has installed it.
struct OutcomePlan {
    enum Step {
        case undo(backups: UInt64, primaries: UInt64)
        case commit(primaries: UInt64, truncate: UInt64, keep: Bool)
    }
    let transaction: TransactionID
    var step: Step
}

/// The engine's owed records, behind a lock; an atomic count lets the hot path skip them. Stored
/// inline in the engine (no reference to retain on the hot path).
struct OutcomePlans: ~Copyable, Sendable {
    private let plans = Mutex<[OutcomePlan]>([])
    let count = Atomic<Int>(0)

    func add(_ plan: OutcomePlan) {
        plans.withLock { plans in
            plans.append(plan)
            count.store(plans.count, ordering: .releasing)
        }
    }

    /// Takes every plan (the caller retries them and adds back what is still owed).
    func takeAll() -> [OutcomePlan] {
        plans.withLock { plans in
            defer {
                plans.removeAll()
                count.store(0, ordering: .releasing)
            }
            return plans
        }
    }
}

extension Engine {
    /// Sends one header-only record (ABORT or COMMIT-PRIMARY) outside a transaction.
    func sendOwed(_ kind: RecordKind, _ id: TransactionID, to node: NodeID, keepUntilTruncate: Bool = false, waiting: Bool = true) -> Bool {
        let point: FaultPoint = kind == .abort ? .abortSend : .commitPrimarySend
        return withUnsafeTemporaryAllocation(byteCount: RecordFormat.headerBytes, alignment: 8) { buffer in
            let writer = RecordWriter(into: buffer.baseAddress!, capacity: RecordFormat.headerBytes, kind: kind,
                                      configuration: configuration.id, transaction: id,
                                      cause: keepUntilTruncate ? RecordFormat.keepUntilTruncate : 0)
            do {
                try faults.check(point, node)
                try send(writer.bytes, to: node, usingReserve: kind == .abort, waiting: waiting)
                return true
            } catch {
                return false
            }
        }
    }

    /// Retries every owed record; what still cannot be delivered stays owed. Without `waiting`
    /// (the node's poller, every 10 ms), a record goes only if its channel has room now.
    /// - Returns: how many plans remain.
    @discardableResult
    package func resolveOwedRecords(waiting: Bool = true) -> Int {
        guard owed.count.load(ordering: .acquiring) > 0 else { return 0 }
        var remaining = 0
        for var plan in owed.takeAll() {
            switch plan.step {
            case .undo(var backups, var primaries):
                for backup in NodeMask(backups) where sendOwed(.abort, plan.transaction, to: backup, waiting: waiting) {
                    backups &= ~(1 << UInt64(backup.index))
                }
                if backups == 0 {
                    for primary in NodeMask(primaries) where sendOwed(.abort, plan.transaction, to: primary, waiting: waiting) {
                        primaries &= ~(1 << UInt64(primary.index))
                    }
                }
                if backups | primaries == 0 { continue }
                plan.step = .undo(backups: backups, primaries: primaries)
            case .commit(var primaries, let truncate, let keep):
                for primary in NodeMask(primaries) where sendOwed(.commitPrimary, plan.transaction, to: primary, keepUntilTruncate: keep, waiting: waiting) {
                    primaries &= ~(1 << UInt64(primary.index))
                }
                if primaries == 0 {
                    // A full batch may wait for ring space: not on the poller (it stays in its
                    // batch for the next flush instead).
                    let full = pendingTruncation.add(plan.transaction, for: truncate)
                    if full != 0, waiting { sendFullTruncationBatches(full) }
                    continue
                }
                plan.step = .commit(primaries: primaries, truncate: truncate, keep: keep)
            }
            owed.add(plan)
            remaining += 1
        }
        if remaining > 0, waiting { logger.warning("\(remaining) transactions still owe ABORT or COMMIT-PRIMARY records to unreachable nodes") }
        return remaining
    }
}
