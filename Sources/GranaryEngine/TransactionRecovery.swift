import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// FaRM's transaction-state recovery (SOSP'15, section 5.3), run by every member when a new
/// configuration removes nodes, before it serves the new configuration:
///
/// 1. **Block** (`Engine.blockCommits(removing:)`): no new commit starts; coordinators waiting
///    for a LOCK answer from a removed node stop waiting (and abort); the node waits until none of
///    its commits is in flight (`Engine.waitForCommitsToEnd(timeout:)`), so it sends no further
///    record of the old configuration. Every member then says so (the membership service's
///    acknowledgement, through the coordination store). From then on only the **recovering
///    regions** (those whose primary or backups the new configuration changes) stay blocked
///    (`Engine.commitOutsideRecoveringRegions(next:)`): a commit that reads and writes only other
///    regions goes ahead, its records stamped with the new configuration, which the drain and the
///    votes tell apart from the old one's.
/// 2. **Drain** (`Engine.drainLogs(removed:next:timeout:)`): once every member has stopped, each
///    processes every record of the old configuration its log holds, the removed nodes' included:
///    the logs are then complete.
/// 3. **Find recovering transactions** and 4. **lock recovery** (`Engine.recoveryVotes(next:)`):
///    every transaction of the old configuration whose records a member still holds gets a vote
///    from it; a member promoted to
///    primary locks the objects of the COMMIT-BACKUP records it holds for its new regions, so that
///    no reader sees them before the decision.
/// 5. **Vote** and 6. **decide** (`decide(votes:in:survivors:)`): one rule over every member's
///    votes, applied by whichever member sees them all first and stored once, so that every member
///    applies the same decisions.
/// 7. **Apply** (`Engine.resolveRecovered(_:)`): commit installs (LOCK) or applies (COMMIT-BACKUP),
///    abort unlocks or drops; every lock is released; then the node moves to the new configuration
///    and, once every member has moved, every commit may start again (`Engine.unblockCommits()`).
///
/// Differences from the paper: the whole node blocks until every member has acknowledged (FaRM
/// blocks only the recovering regions from the start), and the recovering regions stay blocked
/// until every member has moved (FaRM lets each go as soon as its locks are recovered); votes travel
/// through the coordination store rather than as messages to per-transaction recovery
/// coordinators; and REPLICATE-TX-STATE rides on the votes: a backup ships a COMMIT-BACKUP record in
/// its vote only when a region it names lost its primary (`replicated(_:)`), the one case where
/// a survivor may lack a record of a transaction recovery commits.
public enum TransactionRecovery {
    /// What one member's log holds of one transaction after the drain.
    package struct Vote: Hashable, Sendable {
        package enum Kind: UInt8, Sendable {
            /// A LOCK record at a primary: the objects are locked, not installed.
            case lock = 1
            /// A COMMIT-BACKUP record at a backup, not truncated.
            case commitBackup = 2
            /// A COMMIT-PRIMARY kept at a primary (a transaction without backups): installed.
            case commitPrimary = 3
        }
        package var transaction: UInt64
        package var kind: Kind
        /// The regions the record names.
        package var regions: [RegionID]
        /// The whole transaction's backups (a bit per node, in the configuration it ran in), from
        /// the trailer of its LOCK and COMMIT-BACKUP records; 0 for a kept COMMIT-PRIMARY.
        package var backups: UInt64
        /// REPLICATE-TX-STATE: the COMMIT-BACKUP record itself, when a region it names lost its
        /// primary (see ``replicated(_:)``); empty otherwise.
        package var record: [UInt8]

        package init(transaction: UInt64, kind: Kind, regions: [RegionID], backups: UInt64 = 0, record: [UInt8] = []) {
            self.transaction = transaction
            self.kind = kind
            self.regions = regions
            self.backups = backups
            self.record = record
        }
    }

    /// REPLICATE-TX-STATE, through the votes. A transaction whose regions' primaries were all
    /// removed has no LOCK left among the survivors, so DECIDE cannot tell whether its
    /// COMMIT-PRIMARY went out: it commits if any survivor holds its COMMIT-BACKUP. Yet its
    /// coordinator may have died half way through sending COMMIT-BACKUP, so a surviving backup
    /// (the one promoted to primary among them) may lack the record it must apply. Each backup
    /// therefore votes with the record itself for a transaction a region of which lost its
    /// primary, and a survivor that holds no record of a committed transaction applies the
    /// shipped one to its replicas (versions only grow: applying what it had already applied and
    /// truncated changes nothing). (Without this, the crash-restart test saw a backup without an
    /// allocation its new primary held after the coordinator and the primary failed together;
    /// the slot was later allocated again there.) Returns the first record shipped per
    /// transaction.
    package static func replicated(_ votes: [NodeID: [Vote]]) -> [UInt64: [UInt8]] {
        var records: [UInt64: [UInt8]] = [:]
        for list in votes.values {
            for vote in list where !vote.record.isEmpty && records[vote.transaction] == nil {
                records[vote.transaction] = vote.record
            }
        }
        return records
    }

    /// Why votes could not be read.
    package struct MalformedVotes: Error, CustomStringConvertible {
        package let description: String
    }

    /// Votes as bytes: per vote, transaction u64, kind u8, region count u16, regions u32 each,
    /// backups u64, record length u32 and the record's bytes.
    package static func encode(_ votes: [Vote]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(votes.count * 16)
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        put(UInt32(votes.count))
        for vote in votes {
            put(vote.transaction)
            put(vote.kind.rawValue)
            put(UInt16(vote.regions.count))
            for region in vote.regions { put(region.rawValue) }
            put(vote.backups)
            put(UInt32(vote.record.count))
            bytes += vote.record
        }
        return bytes
    }

    package static func decode(_ bytes: [UInt8]) throws(MalformedVotes) -> [Vote] {
        var offset = 0
        func take<T: FixedWidthInteger>(_ type: T.Type) throws(MalformedVotes) -> T {
            guard offset + MemoryLayout<T>.size <= bytes.count else {
                throw MalformedVotes(description: "votes end after \(offset) of \(bytes.count) bytes, inside a field")
            }
            let value = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
            offset += MemoryLayout<T>.size
            return T(littleEndian: value)
        }
        let count = Int(try take(UInt32.self))
        var votes: [Vote] = []
        votes.reserveCapacity(min(count, bytes.count / 23))
        for _ in 0..<count {
            let transaction = try take(UInt64.self)
            let raw = try take(UInt8.self)
            guard let kind = Vote.Kind(rawValue: raw) else { throw MalformedVotes(description: "unknown vote kind \(raw)") }
            let regions = Int(try take(UInt16.self))
            var list: [RegionID] = []
            for _ in 0..<regions { list.append(RegionID(rawValue: try take(UInt32.self))) }
            let backups = try take(UInt64.self)
            let length = Int(try take(UInt32.self))
            guard length <= bytes.count - offset else {
                throw MalformedVotes(description: "a \(length)-byte record of transaction \(transaction) runs past the votes' end")
            }
            let record = Array(bytes[offset..<offset + length])
            offset += length
            votes.append(Vote(transaction: transaction, kind: kind, regions: list, backups: backups, record: record))
        }
        guard offset == bytes.count else { throw MalformedVotes(description: "\(bytes.count - offset) bytes follow the last vote") }
        return votes
    }

    /// DECIDE, for every transaction some survivor voted on: `true` commits it.
    ///
    /// Every LOCK and COMMIT-BACKUP record names the whole transaction's backups (in place of
    /// FaRM's region list), so the rule weighs the records that died with the failed nodes too:
    /// a surviving backup of any region the transaction wrote that holds no COMMIT-BACKUP is
    /// evidence, even if no surviving record names that region.
    ///
    /// A transaction **commits** if a primary kept its COMMIT-PRIMARY, or if some survivor holds
    /// its COMMIT-BACKUP and
    /// - a surviving LOCK shows COMMIT-PRIMARY had not reached that primary: then only if every
    ///   surviving backup of the transaction holds its COMMIT-BACKUP (COMMIT-PRIMARY goes out only
    ///   once every backup has its record, so one missing means COMMIT-BACKUP was under way or
    ///   being undone, and the transaction was never reported committed);
    /// - no survivor holds a LOCK, and a primary of the transaction survives: that primary installed
    ///   it (a LOCK stays in its log until COMMIT-PRIMARY or ABORT, and ABORT after COMMIT-BACKUP
    ///   goes to the backups first), so COMMIT-PRIMARY went out;
    /// - no survivor holds a LOCK and every primary failed: a surviving backup without the record
    ///   may have applied and truncated it (COMMIT-PRIMARY went out) or never received it (the
    ///   coordinator failed during COMMIT-BACKUP), which no log tells apart. It commits: every
    ///   COMMIT-BACKUP record carries the whole write set, and REPLICATE-TX-STATE ships one to
    ///   each replica that holds none (``replicated(_:)``), so every written region gets its
    ///   values either way.
    /// Otherwise it **aborts**: no survivor holds a COMMIT-BACKUP (COMMIT-PRIMARY never went out).
    ///
    /// `configuration` is the one the transactions ran in (for each region's backups),
    /// `survivors` the members of the next one.
    package static func decide(votes: [NodeID: [Vote]], in configuration: Configuration,
                              survivors: Set<NodeID>) -> [UInt64: Bool] {
        struct Evidence {
            var locked = false
            var keptCommitPrimary = false
            var backupsHolding = Set<NodeID>()
            var regions = Set<RegionID>()
            var backups: UInt64 = 0
        }
        var evidence: [UInt64: Evidence] = [:]
        for (node, list) in votes where survivors.contains(node) {
            for vote in list {
                var found = evidence[vote.transaction] ?? Evidence()
                switch vote.kind {
                case .lock: found.locked = true
                case .commitBackup: found.backupsHolding.insert(node)
                case .commitPrimary: found.keptCommitPrimary = true
                }
                found.regions.formUnion(vote.regions)
                found.backups |= vote.backups
                evidence[vote.transaction] = found
            }
        }
        let surviving = survivors.reduce(into: UInt64(0)) { mask, node in
            if node.index < NodeID.limit { mask |= 1 << UInt64(node.index) }
        }
        var decisions: [UInt64: Bool] = [:]
        for (transaction, found) in evidence {
            if found.keptCommitPrimary {
                decisions[transaction] = true
                continue
            }
            guard !found.backupsHolding.isEmpty else {
                decisions[transaction] = false
                continue
            }
            var expected = Set(NodeMask(found.backups & surviving))
            for region in found.regions {
                expected.formUnion((configuration.placement(of: region)?.backups ?? []).filter(survivors.contains))
            }
            // Without a surviving LOCK: a surviving primary installed it, or every primary failed
            // and the shipped records complete it (see above): it commits.
            decisions[transaction] = found.locked ? expected.isSubset(of: found.backupsHolding) : true
        }
        return decisions
    }

    /// What one member's recovery did.
    public struct Report: Sendable, CustomStringConvertible {
        /// Records of recovering transactions this member held that recovery committed: a LOCK
        /// installed, a COMMIT-BACKUP applied. A transaction with records of both kinds here
        /// counts once for each.
        public var committed = 0
        /// Records of recovering transactions this member held that recovery aborted: a LOCK
        /// released unchanged, a COMMIT-BACKUP dropped (a transaction missing from the decisions
        /// aborts).
        public var aborted = 0
        /// Records of committed recovering transactions this member held none of, applied from
        /// another survivor's vote (REPLICATE-TX-STATE: their coordinator and primary failed
        /// before every backup had the COMMIT-BACKUP).
        public var replicated = 0
        /// A report of `committed`, `aborted` and `replicated` records.
        ///
        /// - Parameters:
        ///   - committed: records of transactions recovery committed.
        ///   - aborted: records of transactions recovery aborted.
        ///   - replicated: records another survivor shipped, applied here.
        public init(committed: Int = 0, aborted: Int = 0, replicated: Int = 0) {
            self.committed = committed
            self.aborted = aborted
            self.replicated = replicated
        }
        /// The counts in one line, as a recovery timeline reports them.
        public var description: String {
            "\(committed) recovering transactions committed, \(aborted) aborted\(replicated > 0 ? ", \(replicated) replicated from another survivor's record" : "")"
        }
    }
}

/// Why a step of recovery at this node did not finish.
public struct RecoveryError: Error, CustomStringConvertible {
    /// What did not finish, and why, in a sentence naming the node, region or path concerned.
    public let description: String
    /// An error that says `description`.
    public init(description: String) { self.description = description }
}

/// FaRM's BLOCK step for a node's coordinators: a flag that stops new commits, and counts of
/// commits in flight, one per thread shard on a cache line of its own (a coordinator touches only
/// its own shard's line on every commit).
///
/// Recovery blocks every commit until every member has stopped sending records of the old
/// configuration; from then on until the decisions are applied and every member has moved it
/// blocks only the *recovering regions* (``openUnaffected(blocking:into:)``):
/// a commit whose every read and write lies in a region whose replicas the new configuration keeps
/// goes ahead.
///
/// `@unchecked Sendable`: `counters` and `blockedRegions` are allocated in `init`, freed in
/// `deinit`, and accessed only through atomics. `blockedRegions` is written only while the
/// recovering bit is set and no commit is in flight (``openUnaffected(blocking:)`` runs after the
/// BLOCK step's wait); a commit reads it only after counting itself in flight and seeing the
/// partial bit alone, so it never acts on a table being written.
final class CommitGate: @unchecked Sendable {
    /// Bit 0: recovery runs (every commit blocked); bit 1: this node's lease from the CM lapsed
    /// (it may have been removed); bit 2: recovery runs, but only the regions in `blockedRegions`
    /// are blocked.
    private let blocked = Atomic<UInt8>(0)
    private static let recovering: UInt8 = 1, fenced: UInt8 = 2, partial: UInt8 = 4
    /// Nodes being removed (bit n: node n): coordinators stop waiting for their answers.
    let removing = Atomic<UInt64>(0)
    private static let stride = 16  // words: 128 bytes per shard
    private let counters: UnsafeMutablePointer<Atomic<Int>>
    /// The recovering regions while the partial bit is set: bit r % 64 of word r / 64.
    private let blockedRegions: UnsafeMutablePointer<Atomic<UInt64>>
    private static let regionWords = RegionID.limit / 64
    /// The configuration the recovery that set the partial bit recovers into: commits admitted
    /// meanwhile stamp their records with it.
    private let target = Atomic<UInt64>(0)

    init() {
        let words = threadShards * Self.stride
        counters = UnsafeMutableRawPointer.allocate(byteCount: words * 8, alignment: 128).bindMemory(to: Atomic<Int>.self, capacity: words)
        for index in 0..<words { (counters + index).initialize(to: Atomic<Int>(0)) }
        blockedRegions = .allocate(capacity: Self.regionWords)
        for index in 0..<Self.regionWords { (blockedRegions + index).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        counters.deinitialize(count: threadShards * Self.stride)
        UnsafeMutableRawPointer(counters).deallocate()
        blockedRegions.deinitialize(count: Self.regionWords)
        blockedRegions.deallocate()
    }

    /// Whether commits are held back, all or some (recovery runs, or the lease lapsed).
    var isClosed: Bool { blocked.load(ordering: .acquiring) != 0 }
    /// Whether a recovery holds every commit back (not only those of recovering regions).
    var isRecovering: Bool { blocked.load(ordering: .acquiring) & Self.recovering != 0 }
    /// Whether a recovery holds back only the commits that touch a recovering region.
    var isPartial: Bool { blocked.load(ordering: .acquiring) == Self.partial }
    /// Whether this node's lease lapsed: it may have been removed, and what it sends now may be
    /// refused, so it reports no commit.
    @inline(__always) var isFenced: Bool { blocked.load(ordering: .acquiring) & Self.fenced != 0 }

    /// The configuration the last recovery that let commits through recovers into.
    var recoveryTarget: ConfigurationID { ConfigurationID(rawValue: target.load(ordering: .acquiring)) }

    /// Whether `region` is recovering (meaningful while ``isPartial``).
    @inline(__always) func isBlocked(_ region: RegionID) -> Bool {
        guard region.index < RegionID.limit else { return true }
        return (blockedRegions + region.index / 64).pointee.load(ordering: .relaxed) & (1 << UInt64(region.index % 64)) != 0
    }

    /// Enters a commit: the shard to leave with, or nil while the gate is closed to it. The count
    /// goes up before the flag is read again, and ``close(removing:)`` sets the flag before it
    /// reads the counts: either the closer sees this commit in flight, or this commit sees the
    /// gate closed. While only recovering regions are blocked, `admits` says whether the commit
    /// touches none of them (asked again once the commit is counted in flight).
    @inline(__always) func enter(admits: () -> Bool) -> Int? {
        let state = blocked.load(ordering: .relaxed)
        if state != 0, state != Self.partial || !admits() { return nil }
        let shard = threadShard()
        let counter = counters + shard * Self.stride
        counter.pointee.add(1, ordering: .sequentiallyConsistent)
        let now = blocked.load(ordering: .sequentiallyConsistent)
        if now != 0, now != Self.partial || !admits() {
            counter.pointee.subtract(1, ordering: .releasing)
            return nil
        }
        return shard
    }

    @inline(__always) func leave(_ shard: Int) {
        (counters + shard * Self.stride).pointee.subtract(1, ordering: .releasing)
    }

    func close(removing nodes: UInt64) {
        removing.store(nodes, ordering: .releasing)
        blocked.bitwiseOr(Self.recovering, ordering: .sequentiallyConsistent)
    }

    /// From every commit blocked to only those touching `regions`: called by recovery once every
    /// member has acknowledged (no commit is in flight: the gate was closed and emptied before).
    func openUnaffected(blocking regions: Set<RegionID>, into next: ConfigurationID) {
        target.store(next.rawValue, ordering: .releasing)
        var words = [UInt64](repeating: 0, count: Self.regionWords)
        for region in regions where region.index < RegionID.limit { words[region.index / 64] |= 1 << UInt64(region.index % 64) }
        for index in 0..<Self.regionWords { (blockedRegions + index).pointee.store(words[index], ordering: .relaxed) }
        // Release: a commit that sees the partial bit alone sees the table written above.
        blocked.bitwiseOr(Self.partial, ordering: .sequentiallyConsistent)
        blocked.bitwiseAnd(~Self.recovering, ordering: .sequentiallyConsistent)
    }

    func open() {
        removing.store(0, ordering: .releasing)
        blocked.bitwiseAnd(~(Self.recovering | Self.partial), ordering: .sequentiallyConsistent)
    }

    /// The lease lapsed (true) or was renewed again (false).
    func fence(_ on: Bool) {
        if on {
            if blocked.load(ordering: .relaxed) & Self.fenced == 0 { blocked.bitwiseOr(Self.fenced, ordering: .sequentiallyConsistent) }
        } else if blocked.load(ordering: .relaxed) & Self.fenced != 0 {
            blocked.bitwiseAnd(~Self.fenced, ordering: .sequentiallyConsistent)
        }
    }

    /// Commits in flight now.
    var inFlight: Int {
        (0..<threadShards).reduce(0) { $0 + (counters + $1 * Self.stride).pointee.load(ordering: .sequentiallyConsistent) }
    }
}

extension Engine {
    /// BLOCK: no new commit starts on this node until ``unblockCommits()``; a coordinator waiting
    /// for a LOCK answer from one of `removed` stops waiting and aborts its attempt.
    package func blockCommits(removing removed: [NodeID]) {
        gate.close(removing: removed.reduce(0) { $0 | 1 << UInt64($1.index) })
        // A commit waiting for ring space at a removed node (it stopped polling) stops waiting.
        let view = self.view
        for node in removed where node.index < NodeID.limit {
            view.senders[node.index]?.giveUpWaiting(true)
            view.replySenders[node.index]?.giveUpWaiting(true)
        }
    }

    /// Waits until no commit of this node is in flight: from then on it sends no record of the
    /// old configuration (its owed records wait for recovery, which decides them).
    package func waitForCommitsToEnd(timeout: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while gate.inFlight > 0 {
            guard clock.now < deadline else {
                throw RecoveryError(description: "\(node) still had \(gate.inFlight) commits in flight after \(timeout)")
            }
            try await Task.sleep(for: .microseconds(100))
        }
    }

    /// DRAIN: processes every record this node's log holds, in the configuration they were sent
    /// in. Rings of `removed` senders are served but not waited for (a sender killed in the middle
    /// of a write leaves a frame that never completes).
    ///
    /// Commits admitted outside the recovering regions keep sending records stamped with `next`
    /// meanwhile: a ring is drained once it is empty or has delivered one of those (everything its
    /// sender stamped with the old configuration came before). Their replies in the message
    /// queues are not waited for (no vote depends on a reply).
    package func drainLogs(removed: [NodeID], next: ConfigurationID, timeout: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        let skipped = removed.reduce(UInt64(0)) { $0 | 1 << UInt64($1.index) }
        let partial = gate.isPartial
        func drained() -> Bool {
            let live = channelsInUse.load(ordering: .relaxed) & ~skipped
            return NodeMask(live).allSatisfy { sender in
                if lanes[sender.index].takeUnretainedValue().lastLogStamp >= next.rawValue { return true }
                return mailbox.isEmpty(from: sender) && (partial || mailbox.isEmpty(from: sender, kind: .messages))
            }
        }
        while true {
            let view = self.view
            var handled = 0
            var done = false
            repeat {
                (handled, done) = mailbox.withPoller { poller in (serveMailbox(poller, view: view), drained()) }
            } while handled > 0 && !done
            if done { return }
            guard clock.now < deadline else {
                throw RecoveryError(description: "\(node) could not drain its log within \(timeout):\n\(channelReport)")
            }
            try await Task.sleep(for: .microseconds(100))
        }
    }

    /// FIND RECOVERING TRANSACTIONS and LOCK RECOVERY: this node's votes, after the drain; the
    /// objects of regions it leads in `next` that kept COMMIT-BACKUP records name are locked until
    /// ``resolveRecovered(_:)``.
    package func recoveryVotes(next: Configuration) -> [TransactionRecovery.Vote] {
        let view = self.view
        let promoted = Set(next.regions.filter { $0.primary == node && view.primary(of: $0.region) != node }.map(\.region))
        let removed = view.memberBits & ~next.members.reduce(UInt64(0)) { $0 | 1 << UInt64($1.node.index) }
        let orphaned = Set(configuration.regions.filter { !next.contains($0.primary) }.map(\.region))
        return mailbox.withPoller { _ in
            // From now on the removed nodes' records are refused: the votes cover all they sent.
            refusedSenders.bitwiseOr(removed, ordering: .relaxed)
            return (0..<NodeID.limit).flatMap {
                lanes[$0].takeUnretainedValue().recoveryVotes(view: view, next: next.id, promoted: promoted, orphaned: orphaned)
            }
        }
    }

    /// Once every member has acknowledged (none sends records stamped with the old configuration
    /// any more, and all are in it): commits that touch only regions whose primary and backups
    /// `next` keeps go ahead, stamped with `next` (members take records of a later configuration;
    /// the routing of these regions is the same in both; the drain and the votes leave them out),
    /// while those that touch a recovering region wait for the end of recovery. The records this
    /// node owed (recovery decides their transactions) are dropped first. Returns the recovering
    /// regions.
    ///
    /// FaRM's "block access to recovering regions": here only the regions `next` reroutes are
    /// blocked from this point on; the whole node was blocked until every member had acknowledged.
    @discardableResult
    package func commitOutsideRecoveringRegions(next: Configuration) -> Set<RegionID> {
        let rerouted = configuration.reroutedRegions(in: next)
        _ = owed.takeAll()
        gate.openUnaffected(blocking: rerouted, into: next.id)
        return rerouted
    }

    /// Applies recovery's decisions to every record this node holds of a transaction they name,
    /// drops the records it owed before the recovery (recovery decided their transactions) and
    /// what it kept to truncate at `removed` nodes. Records of transactions the decisions do not
    /// name are stamped with the next configuration, from commits admitted outside the recovering regions
    /// (``commitOutsideRecoveringRegions(next:)``): they are left to their coordinators.
    package func resolveRecovered(_ decisions: [UInt64: Bool], shipped: [UInt64: [UInt8]] = [:],
                                  removed: [NodeID]) -> TransactionRecovery.Report {
        // Owed records of commits admitted outside the recovering regions stay owed.
        if !gate.isPartial { _ = owed.takeAll() }
        for node in removed { _ = pendingTruncation.take(for: node) }
        let view = self.view
        // Every lane's claim, and the backup-apply claim: data recovery's copy into a backup
        // replica takes only the latter.
        let outcome = mailbox.withPoller { _ in withBackupApplyClaim {
            // Each lane applies the shipped records of its own coordinators' transactions (it
            // knows whether it holds a record of one).
            var outcome = (committed: 0, aborted: 0, replicated: 0)
            let shippedByLane = Dictionary(grouping: shipped) { TransactionID(rawValue: $0.key).node.index }
            for index in 0..<NodeID.limit {
                let own = Dictionary(uniqueKeysWithValues: shippedByLane[index] ?? [])
                let lane = lanes[index].takeUnretainedValue().resolveRecovered(decisions, shipped: own, removed: removed, view: view)
                outcome.committed += lane.committed
                outcome.aborted += lane.aborted
                outcome.replicated += lane.replicated
            }
            mailbox.advanceReleased()
            return outcome
        } }
        return TransactionRecovery.Report(committed: outcome.committed, aborted: outcome.aborted, replicated: outcome.replicated)
    }

    /// Lets commits start again.
    package func unblockCommits() { gate.open() }

    /// Fences this node while its lease from the configuration manager has lapsed (`true`) and
    /// lifts the fence once it is renewed (`false`): a fenced node starts no commit, and a commit
    /// that finds it fenced after its last record reports committed only once a grant written
    /// after its records landed proves them counted, else ``TransactionError/outcomeUnknown(reason:)``
    /// (the node may have been removed, and its records refused after the others drained their
    /// logs). Called by the lease thread: one atomic operation.
    package func setFenced(_ fenced: Bool) { gate.fence(fenced) }

    /// Whether commits are held back now (recovery runs, or this node's lease lapsed).
    package var commitsBlocked: Bool { gate.isClosed }

    /// Whether an attempt that aborted for `cause` should wait (``waitForUnblockedCommits(timeout:)``)
    /// rather than retry after the usual delay: while every commit is blocked, any abort; while
    /// only the recovering regions are, one the gate refused or a configuration change ended
    /// (`wrongConfiguration`). A conflict outside the recovering regions retries as usual.
    package func mustWaitForRecovery(after cause: AbortCause) -> Bool {
        gate.isClosed && (!gate.isPartial || cause == .wrongConfiguration)
    }

    /// Waits, on the calling thread, until commits may start again (recovery ended, or the lease
    /// was renewed), the engine stops, or `timeout` passes (by default the reply timeout). For a
    /// coordinator whose attempt found commits blocked (``commitsBlocked``): the attempt does not
    /// count against ``EngineOptions/maximumAttempts`` when this returns true.
    ///
    /// - Returns: whether commits may start now.
    ///
    /// Called while every commit is blocked, it also returns true once only the recovering
    /// regions are: the next attempt goes ahead if it touches none of them. Called while only
    /// those are blocked (the attempt touched one, or aborted while recovery ran), it waits for
    /// the end of recovery: the attempt runs the same body again, which reads the same regions.
    package func waitForUnblockedCommits(timeout: Duration? = nil) -> Bool {
        let start = monotonicNanoseconds()
        let limit = timeout?.wholeNanoseconds ?? replyTimeoutNanoseconds
        let enteredPartial = gate.isPartial
        while gate.isClosed, running.load(ordering: .relaxed), monotonicNanoseconds() - start < limit {
            if !enteredPartial && gate.isPartial { return true }
            usleep(100)
        }
        return !gate.isClosed
    }

    /// The peer an attempt's error names when the error is one that the peer's removal cures: a
    /// dead, silent or paused peer (``TransactionError/peerUnresponsive(_:waitedMilliseconds:)``,
    /// or a transport failure naming it). Such an error reaches the attempt's caller only once the
    /// attempt has aborted (anything it locked released, nothing written), or as
    /// ``TransactionError/outcomeUnknown(reason:)``, which is never retried.
    package static func unreachablePeer(in error: any Error) -> NodeID? {
        switch error as? TransactionError {
        case .peerUnresponsive(let node, _): return node
        case .transport(let failure):
            switch failure {
            case .peerUnreachable(let node, _), .channelFull(let node, _), .unknownNode(let node), .unknownRegion(let node, _, _):
                return node
            default: return nil
            }
        default: return nil
        }
    }

    /// With a configuration manager (``recoversFromFailures``), an attempt that failed on a
    /// dead, silent or paused `error` peer is tried again once the manager has removed the peer
    /// and the survivors recovered without it (FaRM: transactions wait for recovery, they do not
    /// fail): waits up to the reply timeout for a configuration without the peer, and says
    /// whether one came. Without a manager nothing removes a peer: false at once.
    package func retriesAfterRemoval(after error: any Error) -> Bool {
        guard let peer = peerToOutwait(after: error) else { return false }
        let start = monotonicNanoseconds()
        while running.load(ordering: .relaxed), monotonicNanoseconds() - start < replyTimeoutNanoseconds {
            if !configuration.contains(peer) { return waitForUnblockedCommits() }
            usleep(200)
        }
        return false
    }

    /// The peer whose removal ``retriesAfterRemoval(after:)`` waits for: nil without a
    /// configuration manager, for an error no removal cures, or one naming this node.
    private func peerToOutwait(after error: any Error) -> NodeID? {
        guard recoversFromFailures.load(ordering: .relaxed), let peer = Self.unreachablePeer(in: error), peer != node else { return nil }
        return peer
    }

    /// ``retriesAfterRemoval(after:)`` without holding a thread.
    package func retriesAfterRemoval(after error: any Error) async throws -> Bool {
        guard let peer = peerToOutwait(after: error) else { return false }
        let start = monotonicNanoseconds()
        while running.load(ordering: .relaxed), monotonicNanoseconds() - start < replyTimeoutNanoseconds {
            if !configuration.contains(peer) { return try await waitForUnblockedCommits() }
            try await Task.sleep(for: .microseconds(200))
        }
        return false
    }

    /// ``waitForUnblockedCommits(timeout:)`` without holding a thread: from a task (recovery's
    /// own tasks may need the cooperative pool's threads to open the gate).
    package func waitForUnblockedCommits(timeout: Duration? = nil) async throws -> Bool {
        let start = monotonicNanoseconds()
        let limit = timeout?.wholeNanoseconds ?? replyTimeoutNanoseconds
        let enteredPartial = gate.isPartial
        while gate.isClosed, running.load(ordering: .relaxed), monotonicNanoseconds() - start < limit {
            if !enteredPartial && gate.isPartial { return true }
            try await Task.sleep(for: .microseconds(200))
        }
        return !gate.isClosed
    }

}
