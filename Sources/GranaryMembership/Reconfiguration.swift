import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Synchronization

/// How long each step of one member's transaction-state recovery took, from the moment it saw the
/// configuration that removes nodes.
public struct RecoveryTimeline: Sendable, CustomStringConvertible {
    /// The configuration recovered into.
    public var configuration: ConfigurationID
    /// The nodes it removes.
    public var removed: [NodeID]
    /// When this member saw the configuration (monotonic nanoseconds); the figures below count
    /// from it.
    public var seenAt: UInt64 = 0
    /// Nanoseconds from seeing the configuration to: no commit of this node in flight, every member
    /// stopped (acknowledged), the log drained, every vote in, the decisions applied (the node
    /// serves the new configuration, once every member has moved).
    public var quiet: UInt64 = 0
    /// Nanoseconds until every member had acknowledged that it sends no more records of the old
    /// configuration.
    public var acknowledged: UInt64 = 0
    /// Nanoseconds until this member's log was drained.
    public var drained: UInt64 = 0
    /// Nanoseconds until this member's own votes were found (LOCK RECOVERY done) and stored.
    public var posted: UInt64 = 0
    /// Nanoseconds until every member's votes were in.
    public var voted: UInt64 = 0
    /// Nanoseconds until the decisions were stored (by this member or another) and read here.
    public var decided: UInt64 = 0
    /// Nanoseconds until this member had applied the decisions to the records it holds
    /// (`resolveRecovered`).
    public var resolved: UInt64 = 0
    /// Nanoseconds until the replicas the configuration newly places here were open (a spare
    /// region file taken, or a new file).
    public var opened: UInt64 = 0
    /// Nanoseconds until this member had applied the decisions and moved to the configuration
    /// (it then waits for every other member to have moved).
    public var moved: UInt64 = 0
    /// How many regions the configuration reroutes (FaRM's recovering regions): once every member
    /// had acknowledged, commits touching only other regions went ahead (nil: every commit stayed
    /// blocked until the end, as when the configuration adds a member).
    public var recoveringRegions: Int?
    /// Nanoseconds until every member had applied the decisions and moved, and this member's
    /// commits started again.
    public var applied: UInt64 = 0
    /// What applying the decisions did to the records this member held.
    public var report = TransactionRecovery.Report()

    /// The configuration, the nodes removed, each step's time in milliseconds, and the report.
    public var description: String {
        func ms(_ value: UInt64) -> String { String(format: "%.2f", Double(value) / 1e6) }
        let open = recoveringRegions.map { " (\($0) regions recovering, the others open)" } ?? ""
        return "recovery into \(configuration) without \(removed.map(\.description).joined(separator: ",")): quiet \(ms(quiet)) ms, acknowledged \(ms(acknowledged)) ms, drained \(ms(drained)) ms, posted its votes \(ms(posted)) ms, voted \(ms(voted)) ms\(open), decided \(ms(decided)) ms, resolved \(ms(resolved)) ms, replicas opened \(ms(opened)) ms, moved \(ms(moved)) ms, applied \(ms(applied)) ms; \(report)"
    }
}

extension MembershipService {
    /// Transaction-state recovery (``TransactionRecovery``) into `next`, which removes `removed`;
    /// the members meet under ``MembershipPaths/recovery(_:)`` in the coordination store:
    /// `acked/<node>` once a member sends no more records of the old configuration, `votes/<node>`
    /// with its votes after the drain, and `outcome`, created once, with the decisions every member
    /// applies (or, when a newer configuration superseded this one before every vote was in, a
    /// mark that none were made). Returns whether the engine moved to `next`; false when a newer
    /// configuration superseded it (the caller moves on to that one, commits still blocked).
    func recover(into next: Configuration, removed: [NodeID]) async throws -> Bool {
        let start = monotonicNanoseconds()
        var timeline = RecoveryTimeline(configuration: next.id, removed: removed)
        timeline.seenAt = start
        let base = paths.recovery(next.id)
        let me = "\(node.rawValue)"
        // 1. BLOCK, and say so once no record of the old configuration can leave this node.
        engine.blockCommits(removing: removed)
        try await store.createParents(base + "/acked")
        try await store.createParents(base + "/votes")
        try await engine.waitForCommitsToEnd(timeout: .seconds(30))
        timeline.quiet = monotonicNanoseconds() - start
        try await createOnce(base + "/acked/" + me, data: [])
        guard try await waitForEveryMember(of: next, under: base + "/acked") else {
            return try await abandon(base, next: next, removed: removed, timeline: &timeline, start: start)
        }
        timeline.acknowledged = monotonicNanoseconds() - start
        // Every member sends no more records stamped with the old configuration, and every member
        // is in it (each applied any configuration before `next` before it acknowledged): commits
        // that touch only regions whose primary and backups `next` keeps go ahead, stamped with
        // `next` (the drain and the votes tell them apart). FaRM's BLOCK blocks only the
        // recovering regions. (Not when `next` adds a member: it has no view of the old
        // configuration to commit in.)
        let current = engine.configuration
        if current.contains(node), next.members.allSatisfy({ current.contains($0.node) }) {
            timeline.recoveringRegions = engine.commitOutsideRecoveringRegions(next: next).count
        }
        // 2. DRAIN: every record any member (or a removed node) sent in the old configuration is in
        // the logs now.
        // A test's hold: every member has stopped sending records of the old configuration.
        try await waitWhileHeld(holdBeforeDrain, marking: heldBeforeDrain)
        try await engine.drainLogs(removed: removed, next: next.id, timeout: .seconds(30))
        timeline.drained = monotonicNanoseconds() - start
        // 3-4. FIND RECOVERING TRANSACTIONS, LOCK RECOVERY, and this member's votes.
        let votes = engine.recoveryVotes(next: next)
        try await createOnce(base + "/votes/" + me, data: TransactionRecovery.encode(votes))
        timeline.posted = monotonicNanoseconds() - start
        guard try await waitForEveryMember(of: next, under: base + "/votes") else {
            return try await abandon(base, next: next, removed: removed, timeline: &timeline, start: start)
        }
        timeline.voted = monotonicNanoseconds() - start
        // A test's hold: recovery stays between the votes and the decisions.
        try await waitWhileHeld(holdAfterVotes, marking: heldAfterVotes)
        // 5-6. VOTE and DECIDE: whoever gets here first stores the decisions; all apply those.
        var all: [NodeID: [TransactionRecovery.Vote]] = [:]
        for member in next.members {
            let path = base + "/votes/\(member.node.rawValue)"
            do {
                all[member.node] = try TransactionRecovery.decode(try await store.get(path).data)
            } catch let error as TransactionRecovery.MalformedVotes {
                throw RecoveryError(description: "the votes at \(path) are unreadable: \(error)")
            }
        }
        let decisions = TransactionRecovery.decide(votes: all, in: engine.configuration, survivors: Set(next.members.map(\.node)))
        guard let settled = try await settle(base + "/outcome", proposing: Self.encode(decisions)) else {
            logger.info("\(node): recovery into \(next.id) was abandoned by another member, which saw a newer configuration")
            return false
        }
        timeline.decided = monotonicNanoseconds() - start
        try await finish(next, decisions: settled, shipped: TransactionRecovery.replicated(all), removed: removed,
                         timeline: &timeline, start: start)
        return true
    }

    /// 7. Applies the decisions, moves to `next`, and lets commits start again once every member
    /// has moved: a COMMIT-BACKUP of `next` written into the log of a member still in the old
    /// configuration would be refused there, unseen by its coordinator (it has no answer).
    private func finish(_ next: Configuration, decisions: [UInt64: Bool], shipped: [UInt64: [UInt8]] = [:], removed: [NodeID],
                        timeline: inout RecoveryTimeline, start: UInt64) async throws {
        timeline.report = engine.resolveRecovered(decisions, shipped: shipped, removed: removed)
        timeline.resolved = monotonicNanoseconds() - start
        let added = try newRegions(in: next)
        timeline.opened = monotonicNanoseconds() - start
        try engine.apply(next, adding: added)
        timeline.moved = monotonicNanoseconds() - start
        let base = paths.recovery(next.id)
        try await store.createParents(base + "/applied")
        try await createOnce(base + "/applied/\(node.rawValue)", data: [])
        // Superseded here, commits stay blocked: the next configuration's move lets them go.
        guard try await waitForEveryMember(of: next, under: base + "/applied") else { return }
        engine.unblockCommits()
        timeline.applied = monotonicNanoseconds() - start
        let finished = timeline
        recoveries.withLock { $0.append(finished) }
        logger.info("\(node): \(finished)")
        eventSink.yield(.configurationApplied(next.id))
    }

    /// A newer configuration came before every member acknowledged or voted: mark this one's
    /// recovery abandoned, unless someone already stored its decisions (then they are applied).
    private func abandon(_ base: String, next: Configuration, removed: [NodeID],
                         timeline: inout RecoveryTimeline, start: UInt64) async throws -> Bool {
        guard let settled = try await settle(base + "/outcome", proposing: [0]) else {
            logger.info("\(node): recovery into \(next.id) superseded by a newer configuration")
            return false
        }
        try await finish(next, decisions: settled, removed: removed, timeline: &timeline, start: start)
        return true
    }

    /// Waits while a test holds recovery at this point (`hold`), saying so in `held`.
    private func waitWhileHeld(_ hold: borrowing Atomic<Bool>, marking held: borrowing Atomic<Bool>) async throws {
        while hold.load(ordering: .acquiring) {
            held.store(true, ordering: .releasing)
            guard running.load(ordering: .relaxed) else { throw RecoveryError(description: "\(node) stopped during recovery") }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// Creates `path` with `proposal` unless it exists; returns the decisions it holds, or nil if
    /// it marks an abandoned recovery.
    private func settle(_ path: String, proposing proposal: [UInt8]) async throws -> [UInt64: Bool]? {
        var bytes = proposal
        do {
            _ = try await store.create(path, data: proposal, mode: .persistent)
        } catch .nodeExists {
            bytes = try await store.get(path).data
        }
        guard bytes.first == 1 else { return nil }
        guard let decisions = Self.decode(bytes) else {
            throw RecoveryError(description: "the recovery outcome at \(path) is unreadable (\(bytes.count) bytes)")
        }
        return decisions
    }

    private func createOnce(_ path: String, data: [UInt8]) async throws {
        do {
            _ = try await store.create(path, data: data, mode: .persistent)
        } catch .nodeExists {
            return
        }
    }

    /// Waits until every member of `next` has a child under `path`; false if a newer configuration
    /// arrived first (a member died during recovery: the CM removes it too).
    private func waitForEveryMember(of next: Configuration, under path: String) async throws -> Bool {
        let expected = Set(next.members.map { "\($0.node.rawValue)" })
        let start = monotonicNanoseconds()
        var reported = false
        while true {
            let present = Set(try await store.children(path))
            if expected.isSubset(of: present) { return true }
            if !reported, monotonicNanoseconds() - start > 5_000_000_000 {
                // A barrier that lasts is a member that cannot get there: say which, once.
                reported = true
                let missing = expected.subtracting(present).sorted().map { "n\($0)" }.joined(separator: ", ")
                logger.warning("\(node) has waited 5 s under \(path) for \(missing) (in \(engine.configuration.id), newest seen \(newest.withLock { $0 }?.id.description ?? "none"))")
            }
            if let newest = newest.withLock({ $0 }), newest.id > next.id { return false }
            guard running.load(ordering: .relaxed) else { throw RecoveryError(description: "\(node) stopped during recovery") }
            try await pause(microseconds: 200)
        }
    }

    /// A short wait between two looks at the coordination store: on the reconfiguration thread
    /// (``ReconfigurationExecutor``) a blocking sleep, whose wake-up needs no other thread (a
    /// task's sleep is woken by a timer thread, one more thread to wait for a core), elsewhere a
    /// task's sleep.
    func pause(microseconds: UInt32) async throws {
        if reconfigurationExecutor.isCurrent {
            usleep(microseconds)
        } else {
            try await Task.sleep(for: .microseconds(Int(microseconds)))
        }
    }

    /// Decisions as bytes: 1, count u32, then per transaction its id u64 and 1 (commit) or 0.
    static func encode(_ decisions: [UInt64: Bool]) -> [UInt8] {
        var bytes: [UInt8] = [1]
        withUnsafeBytes(of: UInt32(decisions.count).littleEndian) { bytes += $0 }
        for (id, commit) in decisions.sorted(by: { $0.key < $1.key }) {
            withUnsafeBytes(of: id.littleEndian) { bytes += $0 }
            bytes.append(commit ? 1 : 0)
        }
        return bytes
    }

    static func decode(_ bytes: [UInt8]) -> [UInt64: Bool]? {
        guard bytes.count >= 5, bytes[0] == 1 else { return nil }
        let count = Int(bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 1, as: UInt32.self)) })
        guard bytes.count == 5 + count * 9 else { return nil }
        var decisions: [UInt64: Bool] = [:]
        for index in 0..<count {
            let offset = 5 + index * 9
            let id = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
            decisions[id] = bytes[offset + 8] == 1
        }
        return decisions
    }
}
