import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Logging
import Synchronization

/// The configuration manager's role (FaRM, section 5.1), apart from a member's: the member that
/// wins the election holds it. It grants leases to the members, in answer to their renewals, and
/// suspects one that falls silent; it probes the others, waits until every lease it granted the
/// suspects has run out, and commits the configuration without them (with new backups for regions
/// left short); it commits joins (with backups of the regions short of the cluster's replication),
/// and announces every configuration it commits (NEW-CONFIG). Applying a configuration, taking
/// part in recovery and renewing its own lease are the member's part (``MembershipService``).
final class ConfigurationManager: Sendable {
    /// The member whose role this is; it owns this object.
    unowned let member: MembershipService

    init(member: MembershipService) { self.member = member }

    var node: NodeID { member.node }
    var engine: Engine { member.engine }
    var store: any CoordinationStore { member.store }
    var paths: MembershipPaths { member.paths }
    var options: MembershipOptions { member.options }
    var logger: Logger { member.logger }
    var eventSink: AsyncStream<MembershipEvent>.Continuation { member.eventSink }
    func spawn(_ body: @escaping @Sendable () async throws -> Void) { member.spawn(body) }
    func apply(_ configuration: Configuration) async throws { try await member.apply(configuration) }
    func announce(_ id: ConfigurationID) { member.announce(id) }

    /// Bit n set while node n is being removed (its lease is no longer renewed).
    let suspectedNodes = Atomic<UInt64>(0)
    /// Bit n set while member n has not renewed for more than a lease.
    let quietNodes = Atomic<UInt64>(0)
    /// When each member's lease was last renewed.
    let grants = GrantTimes()
    /// Bit n set once member n's lease counter was seen moving (from then on it is held to its
    /// lease; before, a starting member gets a grace period).
    let seenRenewing = Atomic<UInt64>(0)
    /// Nodes being removed now.
    let removing = Mutex<Set<NodeID>>([])
    /// Sets of silent members kept because each holds a region's last replica, logged once each.
    let reportedLastReplicas = Mutex<Set<[NodeID]>>([])

    /// Bit n set when this node connected anew to member n (a node that joined): the lease thread
    /// then watches it as a starting member (``memberReconnected(_:)``).
    let reconnectedNodes = Atomic<UInt64>(0)

    /// This node connected anew to `node`, a member that joined (after dropping every connection
    /// to its former incarnation): what the lease watch saw of the node so far goes (it was seen
    /// through the former connections), and the node is watched as a starting member, with the
    /// grace period, until its counter is seen moving through the new ones. (Seen over soft-RoCE:
    /// a rejoined client whose counter the CM had seen move was then not read for over a lease
    /// while the reader reconnected, and was removed again; or its former incarnation's value,
    /// read after an unreadable first look, passed for a renewal.)
    func memberReconnected(_ node: NodeID) {
        guard node.index < NodeID.limit else { return }
        member.leaseReaders?.forget(node)
        reconnectedNodes.bitwiseOr(1 << UInt64(node.index), ordering: .releasing)
    }

    /// Whether `member`'s lease counter was seen moving.
    func hasSeenRenewing(_ member: NodeID) -> Bool {
        member.index < NodeID.limit && seenRenewing.load(ordering: .acquiring) & (1 << UInt64(member.index)) != 0
    }

    /// TAKING OVER: this node won the election. It records itself as CM in a new configuration;
    /// a CM it replaces that stopped renewing leases leaves the configuration in the same change.
    func takeOver() async throws {
        let node = self.node
        guard !member.stoppedServing else { return }
        // Is the CM we replace silent? Its own lease counter, read twice a lease apart. (Without
        // this, a CM replaced through the election watch before a `refresh` saw it fall silent
        // stayed a member, and was removed only after the grace period a new CM gives members it
        // has never seen renewing: 2 s instead of tens of ms.)
        var silent: NodeID?
        if let old = engine.configuration.manager, old != node {
            // nil: unreadable (a dead peer on verbs), which counts as silent.
            let first = member.leaseCounter(of: old)
            let firstAt = monotonicNanoseconds()
            try await Task.sleep(for: options.lease)
            // Over verbs the second look must be a read begun after that lease (a read still under
            // way, or a reader thread that has not run, proves nothing; `LeaseWatch.observe`),
            // waited for up to two expiries.
            if let readers = member.leaseReaders {
                let lease = options.lease.wholeNanoseconds
                let bound = 2 * options.expiryNanoseconds
                while true {
                    let evidence = readers.evidence(of: old), now = monotonicNanoseconds()
                    if evidence.completedReadStart >= firstAt + lease || now - firstAt >= lease + bound
                        || evidence.unanswered(now: now, for: bound) { break }
                    try await Task.sleep(for: .milliseconds(1))
                }
            }
            if first == member.leaseCounter(of: old) { silent = old }
            // A CM that left on purpose withdrew its registration: it goes too.
            if silent == nil, (try? await store.exists(paths.members + "/\(old)")) == false { silent = old }
        }
        let committed = try await ConfigurationRecord.change(engine.configuration.cluster, in: store) { current in
            var next = current
            next.manager = node
            var removedOld = false
            // A CM that was replaced because it stopped renewing leases leaves the configuration.
            if let old = current.manager, old != node, !self.member.candidatesContain(old) || old == silent {
                next = ConfigurationRecord.removing(old, from: next)
                next.manager = node
                removedOld = true
            }
            // Regions short of the cluster's replication (left short by that removal, or by a
            // cluster reopened without a manager after one removed a node, whose new backups were
            // then dropped) get new backups wherever a member holds no replica of them yet. After
            // a removal the replication is recorded even when no member can take a backup now, so
            // that a node joining later gets them (dropping it made a rejoin leave the regions
            // short: seen in the rejoin test).
            let replenished = ConfigurationRecord.replenishing(next, replicas: ConfigurationRecord.replication(of: current))
            if removedOld || replenished.regions != next.regions { next = replenished }
            return next == current ? nil : next
        }
        if let committed {
            for removed in engine.configuration.members.map(\.node) where !committed.contains(removed) {
                try? await store.delete(paths.members + "/\(removed)", expectedVersion: nil)
            }
            try await apply(committed)
            announce(committed.id)
        }
        member.becomeManager()
    }

    /// Deletes the registration of `removed`, a suspect this CM is about to remove (before the
    /// configuration without it commits, so that a configuration listing it is the one stored):
    /// unless what is registered now is a new incarnation of that node asking to join (an entry
    /// with an endpoint, while no configuration lists the node: another path removed it
    /// meanwhile), which this removal must not undo. (A suspicion that waited for a lease to run
    /// out, while the registration path had removed the node already, deleted the registration
    /// of its next incarnation: an embedded node that rejoined at once was never admitted.)
    func withdrawRegistration(of removed: NodeID) async {
        let path = paths.members + "/\(removed)"
        guard let stored = try? await store.get(path) else { return }
        if let member = try? JSONDecoder().decode(Member.self, from: Data(stored.data)), !member.endpoint.isEmpty,
           let (current, _) = try? await ConfigurationRecord.read(engine.configuration.cluster, from: store), !current.contains(removed) {
            return
        }
        try? await store.delete(path, expectedVersion: stored.version)
    }

    /// As CM: a member whose registration vanished (its session ended) leaves; a registered node
    /// that is not a member joins.
    func watchRegistrations() async throws {
        // Only a registration seen and then gone means a member left; a member that has not
        // registered yet (still starting) is left to the leases and their grace period.
        var seen = Set<NodeID>()
        while member.running.load(ordering: .relaxed), member.isManager {
            // The configuration the listing is judged against: a node whose registration is
            // listed here but that a configuration after this one removed (the lease path deletes
            // a suspect's registration, then commits without it) must not be taken for a node
            // asking to join, which would bring the removed incarnation back as a member that
            // never answers (seen: the recovery barrier of that configuration waited for ever).
            let (listedIn, _) = try await ConfigurationRecord.read(engine.configuration.cluster, from: store)
            let (names, watch) = try await store.childrenAndWatch(paths.members)
            var registered: [Member] = []
            var listed = Set<NodeID>()
            for name in names {
                // A registration listed is present, even if reading it fails now (it may have
                // gone since, which the next listing shows): only one absent from the listing left.
                if let node = MembershipPaths.node(named: name) { listed.insert(node) }
                if let data = try? await store.get(paths.members + "/" + name).data,
                   let member = try? JSONDecoder().decode(Member.self, from: Data(data)) {
                    registered.append(member)
                }
            }
            let registeredNodes = Set(registered.map(\.node)).union(listed)
            seen.formUnion(registeredNodes)
            let left = seen.subtracting(registeredNodes)
            // Members that left (a node leaving on purpose withdraws its registration; a session
            // that ended takes it along): no more grants, and no configuration without them
            // before their leases have run out.
            let leaving = engine.configuration.members.map(\.node).filter { left.contains($0) && $0 != node }
            let bits = leaving.reduce(UInt64(0)) { $0 | 1 << UInt64($1.index) }
            // (Only the bits set here are cleared after: a suspicion may hold others.)
            let fresh = bits & ~suspectedNodes.bitwiseOr(bits, ordering: .acquiringAndReleasing).oldValue
            defer { suspectedNodes.bitwiseAnd(~fresh, ordering: .releasing) }
            if !leaving.isEmpty { try await waitForLeasesToEnd(of: leaving) }
            var listingStale = false
            var awaitingMove = false
            let committed = try await ConfigurationRecord.change(engine.configuration.cluster, in: store) { current in
                guard current.id == listedIn.id else {
                    listingStale = true
                    return nil
                }
                var next = current
                for member in current.members where left.contains(member.node) && member.node != self.node {
                    next = ConfigurationRecord.removing(member.node, from: next)
                }
                if next.members.count < current.members.count {
                    next = ConfigurationRecord.replenishing(next, replicas: ConfigurationRecord.replication(of: current))
                }
                var joined = false
                for member in registered where !current.contains(member.node) && !member.endpoint.isEmpty {
                    // Not before this CM has moved to a configuration without the node's former
                    // incarnation: a move from one listing the former straight to one listing the
                    // new (the removal's recovery superseded) would keep the former's mappings and
                    // keys, and its lease watch, so the new incarnation could look silent. (The
                    // rejoined verbs client removed right after its admission had other causes:
                    // see `LeaseWatch.observe` and `memberReconnected`.)
                    if self.engine.configuration.contains(member.node) {
                        awaitingMove = true
                        continue
                    }
                    next.members.append(member)
                    joined = true
                }
                // A node that joins (or rejoins) receives backups of the regions short of the
                // cluster's replication, copied in the background (DATA RECOVERY).
                if joined {
                    next = ConfigurationRecord.replenishing(next, replicas: ConfigurationRecord.replication(of: current))
                }
                next.manager = self.node
                return next.members == current.members ? nil : next
            }
            if let committed {
                for member in engine.configuration.members where !committed.contains(member.node) {
                    logger.info("\(node) removed \(member.node) (its registration is gone) in \(committed.id)")
                    eventSink.yield(.removed(member.node, committed.id))
                }
                try await apply(committed)
                announce(committed.id)
            }
            // The configuration moved since the listing: list again against the new one. A node
            // asking to join while this CM still moves away from its former incarnation: again
            // shortly (no registration event may come).
            if listingStale { continue }
            if awaitingMove {
                try await Task.sleep(for: .milliseconds(2))
                continue
            }
            if await watch.event() == .sessionEnded { return }
        }
    }

    /// Precise membership: a configuration without `nodes` commits only once every lease this CM
    /// granted them has run out (their bits in ``suspectedNodes`` stop the grants), so that one
    /// still alive has fenced itself before any member acts without it. (A member notices a
    /// renewal up to one renewal interval late and checks its lease once per interval: two
    /// intervals of margin.)
    func waitForLeasesToEnd(of nodes: some Sequence<NodeID>) async throws {
        let leaseEnd = nodes.map { grants.last($0) }.max() ?? 0
        let lease = options.lease.wholeNanoseconds
        let margin = 2 * lease / UInt64(max(1, options.renewalsPerLease))
        let wait = Int64(leaseEnd) + Int64(lease + margin) - Int64(monotonicNanoseconds())
        if wait > 0 { try await Task.sleep(for: .nanoseconds(wait)) }
    }

    // MARK: Leases

    /// What the lease thread keeps of each member's renewals, for the CM's half of its loop.
    struct LeaseWatch {
        /// Per member: its last counter (nil: not read yet), when it last moved, and whether it
        /// was ever seen moving (a node that has not started renewing yet gets a grace period, not
        /// a lease).
        var lastSeen: [NodeID: (value: UInt64?, at: UInt64, live: Bool)] = [:]
        let lease: UInt64
        let expiry: UInt64
        let grace: UInt64

        init(lease: UInt64, expiry: UInt64) {
            self.lease = lease
            self.expiry = expiry
            grace = max(expiry, 2_000_000_000)
        }

        /// What one round of the lease thread made of a member (``observe(_:counter:now:stalled:evidence:)``).
        struct Verdict: Equatable {
            /// Its counter moved since the last round: the CM grants it a lease.
            var renewed = false
            /// ... for the first time since it was first watched.
            var firstRenewal = false
            /// It renewed within the last lease, or has not started renewing yet (false: quiet).
            var renewing = true
            /// Silent for this long (ns), past its expiry (or its grace period, if never seen
            /// renewing): it is to be suspected.
            var silentFor: UInt64?
        }

        /// One round's look at `node`: `counter` as read now (nil: unreadable: a failed read, or,
        /// over verbs, none completed within a lease), `now`, whether the lease thread itself
        /// stalled, and, over verbs, how current the reader's view is (nil: the counter was read
        /// just now, as over shared memory).
        ///
        /// - A member is renewing when its counter moved since the last value read. An unreadable
        ///   first look is no value to compare with: the first value read after it is not a
        ///   renewal (taking it for 0 made a former incarnation's frozen counter, read through the
        ///   connection made to it, pass for one; seen over soft-RoCE).
        /// - Silence is suspected after the expiry (or the grace period of a member never seen
        ///   renewing), once proven: over verbs, by a read begun after that time (it found the
        ///   counter unchanged, or failed), or by a read unanswered for two expiries. No answer
        ///   yet is not silence: seen over soft-RoCE, a read under way for 175 ms (reads take about
        ///   a millisecond there), and a reader thread that had not run for 244 ms, while the guest
        ///   ran four recoveries, each got a live member removed. A read to a dead process fails
        ///   at once (its connection closes); one to a dead host waits for the queue pair's
        ///   retries, which holds its suspicion back by two expiries at most.
        mutating func observe(_ node: NodeID, counter: UInt64?, now: UInt64, stalled: Bool, evidence: LeaseCounterReaders.Evidence?) -> Verdict {
            guard let seen = lastSeen[node] else {
                lastSeen[node] = (counter, now, false)
                return Verdict()
            }
            var verdict = Verdict()
            if let value = counter, let previous = seen.value, previous != value {
                verdict.renewed = true
                verdict.firstRenewal = !seen.live
                lastSeen[node] = (value, now, true)
            } else if let value = counter, seen.value == nil {
                lastSeen[node] = (value, seen.at, seen.live)
            } else if stalled {
                lastSeen[node] = (seen.value, now, seen.live)
            } else {
                let silence = now &- seen.at
                // Whether the reader's view proves no renewal for `limit` after the last one seen.
                let expiry = self.expiry
                func proven(_ limit: UInt64) -> Bool {
                    guard let evidence else { return true }
                    return evidence.completedReadStart >= seen.at &+ limit || evidence.unanswered(now: now, for: 2 * expiry)
                }
                // Quiet (the probe of a suspicion takes it along) only on the same proof.
                verdict.renewing = !seen.live || silence <= lease || !proven(lease)
                let limit = seen.live ? expiry : grace
                if silence > limit, proven(limit) { verdict.silentFor = silence }
            }
            return verdict
        }
    }

    /// A node that left is forgotten: if it joins again, it starts with the grace period of a
    /// starting member, not with the silence of its former self. So is one only in the
    /// configuration this CM moves into: what was seen of it may be of its former incarnation
    /// (kept while the CM moved into the configuration without it, and the one that readmits it
    /// was already seen, the former was suspected at once with its old silence); it is watched
    /// again, as a starting member.
    func forgetNodes(outside configuration: Configuration, watch: inout LeaseWatch) {
        for node in watch.lastSeen.keys where !configuration.contains(node) {
            forget(node, watch: &watch)
        }
    }

    private func forget(_ node: NodeID, watch: inout LeaseWatch) {
        watch.lastSeen[node] = nil
        seenRenewing.bitwiseAnd(~(1 << UInt64(node.index)), ordering: .releasing)
    }

    /// The CM's half of one round of the lease thread (`counter` is its own lease counter, `now`
    /// the time; `stalled`: the thread itself did not run for half an expiry). Takes no lock: the
    /// lease thread runs at real-time priority.
    ///
    /// `moving`: the configuration this node is moving into, if newer than `configuration`: its
    /// members are watched too (and suspected when silent), but granted leases only once they are
    /// members of the configuration applied here.
    func grantLeases(counter: UInt64, now: UInt64, stalled: Bool, in configuration: Configuration, movingTo moving: Configuration?,
                     watch: inout LeaseWatch) {
        let suspected = suspectedNodes.load(ordering: .acquiring)
        if reconnectedNodes.load(ordering: .relaxed) != 0 {
            var reconnected = reconnectedNodes.exchange(0, ordering: .acquiringAndReleasing)
            while reconnected != 0 {
                let index = reconnected.trailingZeroBitCount
                reconnected &= reconnected - 1
                forget(NodeID(rawValue: UInt16(index)), watch: &watch)
            }
        }
        // (No array is made while no move is under way: this runs every renewal interval.)
        let watched = moving.map { moving in configuration.members + moving.members.filter { !configuration.contains($0.node) } }
            ?? configuration.members
        for member in watched where member.node != node {
            // Check the member renewed ours, then renew its lease: only in answer to a renewal
            // (its counter moved since the last round), as FaRM grants leases, so that a member
            // that falls silent holds its lease for one lease after its last renewal and no
            // longer, and a removed one has lost it by the time the configuration without it
            // commits. (Granting while the member had renewed within the last lease, as before,
            // stretched a silent member's lease to two: the removal waited for it.)
            // (The evidence first: the counter read next is then at least as new.)
            let evidence = self.member.leaseReaders?.evidence(of: member.node)
            let verdict = watch.observe(member.node, counter: self.member.leaseCounter(of: member.node), now: now, stalled: stalled,
                                        evidence: evidence)
            let renewing = verdict.renewing, renewed = verdict.renewed
            if verdict.firstRenewal { seenRenewing.bitwiseOr(1 << UInt64(member.node.index), ordering: .releasing) }
            if let silence = verdict.silentFor { suspect(member.node, silentFor: silence) }
            // Members silent for more than a lease (their lease from this CM has lapsed):
            // the probe of a reconfiguration removes them with the suspect. (Over shared
            // memory a dead node's lease word stays readable: readability proves nothing.)
            let bit: UInt64 = 1 << UInt64(member.node.index)
            if renewing {
                if quietNodes.load(ordering: .relaxed) & bit != 0 { quietNodes.bitwiseAnd(~bit, ordering: .releasing) }
            } else if quietNodes.load(ordering: .relaxed) & bit == 0 {
                quietNodes.bitwiseOr(bit, ordering: .releasing)
            }
            guard renewed, suspected & (1 << UInt64(member.node.index)) == 0, configuration.contains(member.node) else { continue }
            var grant = counter
            let granted = (try? withUnsafeBytes(of: &grant) { (bytes) throws(TransportError) in
                try engine.transportHandle.write(to: member.node, LeaseWords.grantAddress(of: member.node), from: bytes)
            }) != nil
            if granted { grants.record(member.node, at: monotonicNanoseconds()) }
        }
    }

    /// Over verbs: whether `node`, whose counter has no value read within a lease, may still
    /// answer: its reader's latest read did not fail, and none has been under way for two expiries
    /// (a reader behind, on a slow read or not yet run, proves no silence; `LeaseWatch.observe`).
    func mayStillAnswer(_ node: NodeID) -> Bool {
        guard let readers = member.leaseReaders else { return false }
        let evidence = readers.evidence(of: node)
        return !evidence.latestFailed && !evidence.unanswered(now: monotonicNanoseconds(), for: 2 * options.expiryNanoseconds)
    }

    /// As CM: remove `suspect` from the configuration (once); no renewal of it was seen for
    /// `silentFor` nanoseconds (said in the log, with why the probe adds any other member).
    func suspect(_ suspect: NodeID, silentFor: UInt64) {
        guard removing.withLock({ $0.insert(suspect).inserted }) else { return }
        suspectedNodes.bitwiseOr(1 << UInt64(suspect.index), ordering: .releasing)
        // Taken on the lease thread: no formatting here.
        let suspectedAt = monotonicNanoseconds()
        // Over verbs: what the suspect's lease reader was doing (blocked in a read, not run, or
        // reading a value that did not change).
        let account = member.leaseReaders?.account(of: suspect)
        spawn {
            // Why each suspect goes, for the log: a removal of a live node (a false suspicion)
            // must say what the CM saw.
            var reasons: [NodeID: String] = [suspect: "no renewal seen for \(silentFor / 1_000_000) ms" + (account.map { "; \($0)" } ?? "")]
            // Probe: one one-sided read of every other member's lease word; a member that does not
            // answer is suspected too, and goes in the same reconfiguration.
            var suspects: Set<NodeID> = [suspect]
            for member in self.engine.configuration.members where member.node != self.node && member.node != suspect {
                let answered = self.member.leaseCounter(of: member.node) != nil || self.mayStillAnswer(member.node)
                let quiet = self.quietNodes.load(ordering: .acquiring) & (1 << UInt64(member.node.index)) != 0
                if !answered || quiet {
                    suspects.insert(member.node)
                    reasons[member.node] = answered ? "probe: no renewal for more than a lease" : "probe: its lease word did not answer"
                }
            }
            for other in suspects { self.suspectedNodes.bitwiseOr(1 << UInt64(other.index), ordering: .releasing) }
            defer {
                self.removing.withLock { removing in suspects.forEach { removing.remove($0) } }
                for other in suspects { self.suspectedNodes.bitwiseAnd(~(1 << UInt64(other.index)), ordering: .releasing) }
            }
            let node = self.node
            try await self.waitForLeasesToEnd(of: suspects)
            // Members that fell silent for a lease while this waited (a second crash just after
            // the first) go in the same change, once their leases have run out too: left out,
            // the recovery would have to wait for commits waiting on them.
            let quietNow = self.quietNodes.load(ordering: .acquiring)
            let more = self.engine.configuration.members.map(\.node).filter {
                $0 != node && !suspects.contains($0) && quietNow & (1 << UInt64($0.index)) != 0
            }
            if !more.isEmpty {
                let waited = (monotonicNanoseconds() - suspectedAt) / 1_000_000
                for other in more {
                    reasons[other] = "fell silent for a lease while the CM waited \(waited) ms for the suspects' leases to end"
                    suspects.insert(other)
                    self.suspectedNodes.bitwiseOr(1 << UInt64(other.index), ordering: .releasing)
                }
                try await self.waitForLeasesToEnd(of: more)
            }
            // The registrations go first (a dead node's session may live on for a while): if this
            // CM dies after committing, its successor must not take a registration left behind
            // for a node asking to join, and bring the removed node back.
            // A suspect that holds the last replica of a region stays a member: removing it would
            // drop the region from the configuration (its data lost for good), while a suspicion
            // can be false (a lease thread the host held off). If it really failed, its regions
            // wait for it to come back. (Its registration stays too.)
            let (planned, _) = try await ConfigurationRecord.read(self.engine.configuration.cluster, from: self.store)
            let kept = ConfigurationRecord.removingSuspects(suspects, from: planned).kept
            let removable = suspects.subtracting(kept)
            for removed in removable { await self.withdrawRegistration(of: removed) }
            if !kept.isEmpty, self.reportedLastReplicas.withLock({ $0.insert(kept).inserted }) {
                self.logger.error("\(node) keeps \(kept.map(\.description).joined(separator: ", ")) in the configuration although silent: each holds the last replica of a region, which removing it would lose")
            }
            let committed = try await ConfigurationRecord.change(self.engine.configuration.cluster, in: self.store) { current in
                let present = removable.filter { current.contains($0) }
                guard !present.isEmpty else { return nil }
                var next = ConfigurationRecord.removingSuspects(present, from: current).next
                guard next.members.count < current.members.count else { return nil }
                next = ConfigurationRecord.replenishing(next, replicas: ConfigurationRecord.replication(of: current))
                next.manager = node
                return next
            }
            if let committed {
                for removed in suspects where !committed.contains(removed) {
                    // It rejoins, if ever, by registering anew.
                    await self.member.withdrawCandidates { $0 == removed }
                    self.logger.info("\(node) removed \(removed) (lease expired: \(reasons[removed] ?? "silent")) in \(committed.id)")
                    self.eventSink.yield(.removed(removed, committed.id))
                }
                try await self.apply(committed)
                self.announce(committed.id)
            }
        }
    }
}
