import GranaryConfiguration
import GranaryEngine
import GranaryMemory
import Testing

/// DECIDE and REPLICATE-TX-STATE against every point at which a coordinator can fail.
///
/// A model of one commit's records (who holds a LOCK, a COMMIT-BACKUP, who installed or truncated)
/// at each step of the protocol as `Commit.swift` sends it: LOCK to the primaries, COMMIT-BACKUP to
/// the backups in ascending node order (or, when a COMMIT-BACKUP send fails, ABORT to the backups
/// that got one and then to the primaries), COMMIT-PRIMARY to the primaries, TRUNCATE to any subset
/// of the backups. The coordinator fails after any step, alone or with one other node (f = 2 of 3
/// replicas). The survivors' votes are what `RecordProcessor.recoveryVotes` makes of those records
/// (a COMMIT-BACKUP record names the transaction's backups, carries the whole write set, and ships
/// when a region of the transaction lost its primary); `TransactionRecovery.decide` and
/// `replicated` run on them, and the outcome is checked: a transaction whose COMMIT-PRIMARY went
/// out commits; a committed one reaches every surviving replica of every region it wrote (from a
/// LOCK, a COMMIT-BACKUP, an install or truncation already done, or a shipped record); an aborted
/// one left no surviving replica changed.
extension RecoveryTests {
    /// Where one commit's records stand.
    struct CommitRecords {
        var locked: Set<Int> = []
        var backedUp: Set<Int> = []
        var installed: Set<Int> = []
        var truncated: Set<Int> = []
        var commitPrimarySent = false
    }

    /// Every state a commit of `written` (region indexes of `configuration`) can leave behind.
    func reachableStates(of written: [RegionPlacement]) -> [CommitRecords] {
        let primaries = Set(written.map(\.primary.index)).sorted()
        let backups = Set(written.flatMap { $0.backups.map(\.index) }).sorted()
        var states = [CommitRecords()]
        var state = CommitRecords()
        for primary in primaries {
            state.locked.insert(primary)
            states.append(state)
        }
        for (index, backup) in backups.enumerated() {
            // The send to `backup` fails: ABORT to the backups that got a record, then the primaries.
            var undo = state
            for sent in backups.prefix(index) {
                undo.backedUp.remove(sent)
                states.append(undo)
            }
            for primary in primaries {
                undo.locked.remove(primary)
                states.append(undo)
            }
            state.backedUp.insert(backup)
            states.append(state)
        }
        for primary in primaries {
            state.installed.insert(primary)
            state.locked.remove(primary)
            state.commitPrimarySent = true
            states.append(state)
        }
        for mask in 1..<(1 << backups.count) {
            var truncated = state
            for (index, backup) in backups.enumerated() where mask & (1 << index) != 0 {
                truncated.truncated.insert(backup)
                truncated.backedUp.remove(backup)
            }
            states.append(truncated)
        }
        return states
    }

    @Test("the decision rule with REPLICATE-TX-STATE, for every write set of up to 3 regions, every step a coordinator can fail after, alone or with another node: a commit that may have been reported commits, a committed transaction reaches every surviving replica, an aborted one changed none")
    func decisionModel() throws {
        let (cases, violations) = try modelViolations(recordsNameEveryBackup: true, wholeWriteSet: true)
        #expect(cases > 10_000, "only \(cases) cases")
        #expect(violations.isEmpty, "\(violations.count) of \(cases) cases:\n\(violations.prefix(20).joined(separator: "\n"))")
        // The model fails records that name only their own regions, or COMMIT-BACKUPs that carry
        // only their receiver's entries (Granary before both).
        let ownRegions = try modelViolations(recordsNameEveryBackup: false, wholeWriteSet: true).violations
        #expect(!ownRegions.isEmpty, "records without the transaction's backups passed the model")
        let ownEntries = try modelViolations(recordsNameEveryBackup: true, wholeWriteSet: false).violations
        #expect(!ownEntries.isEmpty, "COMMIT-BACKUP records of the receiver's entries alone passed the model")
    }

    /// The model's cases and its violations, with records that name the transaction's backups or
    /// not, and COMMIT-BACKUP records that carry the whole write set or their receiver's entries.
    func modelViolations(recordsNameEveryBackup: Bool, wholeWriteSet: Bool) throws -> (cases: Int, violations: [String]) {
        let configuration = try fiveNodes()
        let placements = configuration.regions
        var violations: [String] = []
        var cases = 0
        func subsets(_ count: Int, of items: [Int]) -> [[Int]] {
            guard count > 0 else { return [[]] }
            guard let first = items.first else { return [] }
            let rest = Array(items.dropFirst())
            return subsets(count - 1, of: rest).map { [first] + $0 } + subsets(count, of: rest)
        }
        for coordinator in 0..<5 {
            for size in 1...3 {
                for indexes in subsets(size, of: Array(placements.indices)) {
                    let written = indexes.map { placements[$0] }
                    let backupMask = recordsNameEveryBackup
                        ? written.reduce(UInt64(0)) { mask, placement in placement.backups.reduce(mask) { $0 | 1 << UInt64($1.index) } } : 0
                    for state in reachableStates(of: written) {
                        for other in [nil] + (0..<5).filter({ $0 != coordinator }) {
                            cases += 1
                            let failed = Set([coordinator] + (other.map { [$0] } ?? []))
                            let survivors = Set((0..<5).filter { !failed.contains($0) })
                            let orphaned = Set(placements.filter { failed.contains($0.primary.index) }.map(\.region))
                            let ships = !Set(written.map(\.region)).isDisjoint(with: orphaned)
                            // The regions a shipped record carries: the whole write set, or its
                            // holder's own (the first holder's: `replicated` ships one record).
                            let firstHolder = survivors.sorted().first { state.backedUp.contains($0) }
                            let carried = Set(written.filter { placement in
                                wholeWriteSet || firstHolder.map { placement.backups.contains(NodeID($0)) } ?? false
                            }.map(\.region))
                            var votes: [NodeID: [Vote]] = [:]
                            for node in survivors {
                                var list: [Vote] = []
                                if state.locked.contains(node) {
                                    list.append(Vote(transaction: 7, kind: .lock, regions: written.filter { $0.primary.index == node }.map(\.region),
                                                     backups: backupMask))
                                }
                                if state.backedUp.contains(node) {
                                    list.append(Vote(transaction: 7, kind: .commitBackup,
                                                     regions: written.filter { $0.backups.contains(NodeID(node)) }.map(\.region),
                                                     backups: backupMask, record: ships ? [1] : []))
                                }
                                if !list.isEmpty { votes[NodeID(node)] = list }
                            }
                            let decision = TransactionRecovery.decide(votes: votes, in: configuration,
                                                                      survivors: Set(survivors.map { NodeID($0) }))[7]
                            let shipped = TransactionRecovery.replicated(votes)[7] != nil
                            // Per surviving replica of each written region: applied already, or
                            // will apply if the transaction commits.
                            var problems: [String] = []
                            var appliedAlready: [Bool] = []
                            for placement in written {
                                for replica in placement.replicas.map(\.index) where survivors.contains(replica) {
                                    let isPrimary = replica == placement.primary.index
                                    let role = "n\(replica) (\(isPrimary ? "primary" : "backup") of \(placement.region))"
                                    let applied = isPrimary ? state.installed.contains(replica) : state.truncated.contains(replica)
                                    appliedAlready.append(applied)
                                    let holdsRecord = state.locked.contains(replica) || state.backedUp.contains(replica)
                                    let appliesOnCommit = applied || (isPrimary ? state.locked.contains(replica) : state.backedUp.contains(replica))
                                        || (shipped && !holdsRecord && carried.contains(placement.region))
                                    if decision == true, !appliesOnCommit { problems.append("\(role) gets no values") }
                                    if decision == false, applied { problems.append("\(role) applied it") }
                                }
                            }
                            if decision == false, state.commitPrimarySent { problems.append("COMMIT-PRIMARY went out") }
                            if decision == nil, Set(appliedAlready).count > 1 || (state.commitPrimarySent && appliedAlready.contains(false)) {
                                problems.append("no vote, and the surviving replicas applied it: \(appliedAlready)")
                            }
                            if !problems.isEmpty {
                                violations.append("coordinator n\(coordinator) writing \(written.map(\.region)), failed \(failed.sorted()), locked \(state.locked.sorted()), backed up \(state.backedUp.sorted()), installed \(state.installed.sorted()), truncated \(state.truncated.sorted()): decided \(decision.map { $0 ? "commit" : "abort" } ?? "nothing"), shipped \(shipped): \(problems.joined(separator: "; "))")
                            }
                        }
                    }
                }
            }
        }
        return (cases, violations)
    }
}
