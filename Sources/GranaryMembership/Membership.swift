import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a node's membership service observed.
public enum MembershipEvent: Sendable, Equatable {
    /// This node became the configuration manager.
    case becameManager(ConfigurationID)
    /// This node moved to a new configuration.
    case configurationApplied(ConfigurationID)
    /// As manager, this node removed `node` whose lease expired.
    case removed(NodeID, ConfigurationID)
    /// This node is not in the configuration any more: it must rejoin as a new member.
    case mustRejoin(ConfigurationID)
}

/// A node's part in membership: election of the configuration manager (CM) through the
/// coordination store, its own lease, following the configuration and applying each new one to
/// the node's engine (through transaction-state recovery, `Reconfiguration.swift`, when the
/// routing changes), data recovery of the regions placed on it, and joining. The member that wins
/// the election also holds the CM's role (`ConfigurationManager`: granting leases, failure
/// detection, committing configurations).
///
/// Leases are one-sided: every node's lease thread increments a counter in its own mailbox (its
/// grant to others) and the CM writes a grant counter into each member's mailbox; a node watches
/// its grant, the CM watches every member's counter. The lease thread does nothing else, so
/// transaction work never delays a renewal. The store is used only to agree on configurations.
public final class MembershipService: Sendable {
    /// The node this service runs for.
    public let node: NodeID
    package let paths: MembershipPaths
    package let options: MembershipOptions
    let engine: Engine
    let store: any CoordinationStore
    let connect: @Sendable (Member) throws -> Void
    let openRegion: @Sendable (RegionPlacement) throws -> Region
    let logger: Logger
    let eventStream: AsyncStream<MembershipEvent>
    let eventSink: AsyncStream<MembershipEvent>.Continuation

    struct State {
        var electionNode: String?
        var takingOver = false
        var mustRejoin = false
        /// Set by the first ``stopServing(_:because:)``, before the engine stops (``mustRejoin``
        /// after it).
        var stoppedServing = false
        /// Set while this node joins (``start(joining:)``): until a configuration lists it, those
        /// without it are passed over (up to `passedOver`), not taken for its removal.
        var joining = false
        var passedOver: ConfigurationID?
        /// Set once a configuration listing this node was seen: a joiner listed and then left out
        /// again was removed (its admission superseded), not passed over.
        var listedOnce = false
        /// Regions this node is copying from their primaries now.
        var copyingRegions: Set<RegionID> = []
    }
    let state = Mutex(State())
    let running = Atomic<Bool>(true)
    /// For tests: while set, a recovery of this member waits after every vote is in (commits
    /// outside the recovering regions already go ahead), and sets `heldAfterVotes`.
    package let holdAfterVotes = Atomic<Bool>(false)
    package let heldAfterVotes = Atomic<Bool>(false)
    /// For tests: the same, before the drain (every member has acknowledged).
    package let holdBeforeDrain = Atomic<Bool>(false)
    package let heldBeforeDrain = Atomic<Bool>(false)
    /// Set while this node's request for a region is being written (``requestRegion()``).
    let regionRequestPending = Atomic<Bool>(false)
    /// The thread the task that moves the engine (reconfiguration, recovery) runs on.
    let reconfigurationExecutor = ReconfigurationExecutor(name: "granary-reconfiguration")
    private let leaseThread = Mutex<pthread_t?>(nil)
    /// Readers of peers' lease counters, where the transport's reads of a dead peer block (not
    /// shared memory); nil otherwise.
    let leaseReaders: LeaseCounterReaders?
    /// The tasks running now (cancelled at stop); each leaves when it ends.
    let tasks = Mutex<(next: UInt64, running: [UInt64: Task<Void, Never>])>((0, [:]))

    /// - Parameters:
    ///   - connect: makes a member that joined reachable through the engine's transport (called
    ///     once for each node a new configuration adds, a node that rejoins included).
    ///   - openRegion: opens or creates this node's replica of a region newly placed on it and
    ///     registers it with the transport.
    package init(engine: Engine, store: any CoordinationStore, options: MembershipOptions = MembershipOptions(),
                logger: Logger? = nil, connect: @escaping @Sendable (Member) throws -> Void,
                openRegion: @escaping @Sendable (RegionPlacement) throws -> Region) {
        self.node = engine.node
        self.engine = engine
        self.store = store
        self.options = options
        self.paths = MembershipPaths(cluster: engine.configuration.cluster)
        self.connect = connect
        self.openRegion = openRegion
        self.logger = logger ?? Logger(label: "granary.membership.\(engine.node)")
        (eventStream, eventSink) = AsyncStream.makeStream(of: MembershipEvent.self)
        if engine.transportHandle is SharedMemoryTransport {
            leaseReaders = nil
        } else {
            let transport = engine.transportHandle
            leaseReaders = LeaseCounterReaders(interval: options.renewalIntervalNanoseconds, staleAfter: options.lease.wholeNanoseconds) { node in
                Self.readLeaseCounter(of: node, through: transport)
            }
        }
        managerRole.store(UInt(bitPattern: Unmanaged.passRetained(ConfigurationManager(member: self)).toOpaque()), ordering: .releasing)
    }

    deinit {
        Unmanaged<ConfigurationManager>.fromOpaque(UnsafeRawPointer(bitPattern: managerRole.load(ordering: .acquiring))!).release()
    }

    /// Every transaction-state recovery this node ran, in order.
    public var recoveryTimelines: [RecoveryTimeline] { recoveries.withLock { $0 } }
    let recoveries = Mutex<[RecoveryTimeline]>([])

    /// The events, in order.
    public var events: AsyncStream<MembershipEvent> { eventStream }

    /// Whether this node is the configuration manager now.
    public var isManager: Bool { managerFlag.load(ordering: .acquiring) }

    /// This node's configuration-manager role, active while ``isManager``.
    var manager: ConfigurationManager {
        Unmanaged<ConfigurationManager>.fromOpaque(UnsafeRawPointer(bitPattern: managerRole.load(ordering: .acquiring))!)
            .takeUnretainedValue()
    }
    /// The role's object, retained, made once by `init` (it refers back to this service, so it
    /// cannot be a stored `let` made before `self` exists) and released by `deinit`; read without
    /// a lock, since the lease thread reads it on every round.
    private let managerRole = Atomic<UInt>(0)

    /// An atomic, not part of `state`: the lease thread reads it, and it runs at real-time priority
    /// and must never wait for a lock that an ordinary thread (starved on a busy machine) holds.
    let managerFlag = Atomic<Bool>(false)
    /// Bits set while a refresh of the configuration from the store is under way: 1 for one that
    /// a NEW-CONFIG announcement asked for, 2 for one that checks a silent CM. Two bits, so that
    /// announcements never keep the CM check from running (seen over ZooKeeper: a member still
    /// recovering into an announced configuration refreshed on every lease interval, the CM check
    /// rarely found the flag free, and the failover of a killed CM took the 4 s session timeout).
    private let refreshing = Atomic<UInt8>(0)
    /// The id of the newest configuration seen (``apply(_:)``), for the lease thread.
    private let newestSeen = Atomic<UInt64>(0)

    /// Whether this node learned that it was removed from the configuration: it serves nothing
    /// more and must rejoin as a new member.
    public var mustRejoin: Bool { state.withLock { $0.mustRejoin } }
    /// Whether this node has begun to stop serving (``mustRejoin`` follows once its engine stopped).
    var stoppedServing: Bool { state.withLock { $0.stoppedServing } }

    /// Registers the node, joins the election, follows the configuration and starts the lease
    /// thread. The configuration must be in the store (``ConfigurationRecord/bootstrap(_:in:)``).
    ///
    /// - Parameter joining: this node is not in the stored configuration (a new node, or one
    ///   restarted after it was removed); its engine runs that configuration with itself added and
    ///   no replicas. The CM adds it on seeing its registration, with new backups of the regions
    ///   short of the cluster's replication; until its lease is first granted, it starts no commit.
    package func start(joining: Bool = false) async throws {
        if joining { state.withLock { $0.joining = true } }
        // No member commits before it holds a lease: fenced until the CM's first grant (or until
        // it becomes the CM). A member of the first configuration that committed in its first
        // lease, before any CM was elected, found itself fenced when the lease lapsed ungranted,
        // and had to report its commit's outcome unknown.
        engine.setFenced(true)
        engine.recoversFromFailures.store(true, ordering: .relaxed)
        // The registration says whether this node asks to join: a joining node registers its
        // member entry (the CM adds it); a member of the stored configuration registers without an
        // endpoint, which the CM never takes for a request to join. (A member removed just after
        // it registered, e.g. an old CM judged silent at a cluster's reopen before it started,
        // had its registration taken for a join: the CM added it back, but the node had stopped
        // serving, and every member waited for its acknowledgement in the recovery barrier for
        // ever. Seen in the crash-restart test.)
        let listed = engine.configuration.members.first { $0.node == node } ?? Member(node: node, endpoint: "")
        let member = joining ? listed : Member(node: node, endpoint: "", client: listed.client)
        try await register(Array(try JSONEncoder().encode(member)))
        // A client never becomes the CM: it holds no region, and client processes come and go.
        if !member.client {
            let election = try await store.create(paths.election + "/n-", data: Array("\(node.rawValue)".utf8), mode: [.ephemeral, .sequential])
            state.withLock { $0.electionNode = election }
        }
        spawn { try await self.followConfiguration() }
        if !member.client { spawn { try await self.elect() } }
        // A member that starts in a configuration where it is copying a region (a cluster
        // stopped as a whole during a copy, started again) copies it again from the start.
        startCopies(in: engine.configuration)
        startLeaseThread()
        // Regions on demand go through the CM (``requestRegion()``); a client allocates at the
        // primaries of others' regions and asks for none.
        if !member.client {
            engine.supplyRegions { [weak self] _ in
                guard let self else { throw CoordinationError.sessionExpired }
                try self.requestRegion()
            }
        }
    }

    private func register(_ data: [UInt8]) async throws(CoordinationError) {
        do {
            _ = try await store.create(paths.members + "/\(node)", data: data, mode: .ephemeral)
        } catch .nodeExists {
            return
        }
    }

    /// LEAVE: this node leaves the configuration on purpose (a node process told SIGTERM). It
    /// starts no more commits and lets those in flight end, sends the TRUNCATEs it owes, gives up
    /// the CM's role if it holds it, and withdraws its registration and candidacy: the CM removes
    /// it at once, without a suspicion, once its lease has run out, and the others recover
    /// without it as after a failure (its transactions are all decided by then). Returns the
    /// first committed configuration without this node.
    ///
    /// - Throws: ``RecoveryError`` if no such configuration is committed within `timeout` (no CM
    ///   is left to remove it, for instance when it is the last member).
    package func leave(timeout: Duration = .seconds(10)) async throws -> Configuration {
        leavingFlag.store(true, ordering: .releasing)
        engine.blockCommits(removing: [])
        try await engine.waitForCommitsToEnd(timeout: timeout)
        try? engine.flushTruncations()
        // A CM that leaves stops acting as one first; the next candidate takes over when its
        // candidacy goes, and removes it.
        managerFlag.store(false, ordering: .releasing)
        if let election = state.withLock({ $0.electionNode }) { try? await store.delete(election, expectedVersion: nil) }
        try? await store.delete(paths.members + "/\(node)", expectedVersion: nil)
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let (configuration, _) = try await ConfigurationRecord.read(engine.configuration.cluster, from: store)
            if !configuration.contains(node) {
                logger.info("\(node) left: \(configuration.id) is without it")
                return configuration
            }
            guard clock.now < deadline else {
                throw RecoveryError(description: "\(node) withdrew its registration, but no configuration without it was committed within \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    /// Whether this node is leaving (`leave(timeout:)`): it is not to rejoin once removed.
    public var isLeaving: Bool { leavingFlag.load(ordering: .acquiring) }
    private let leavingFlag = Atomic<Bool>(false)

    /// Stops the lease thread and the watches, and ends the store session.
    package func stop() async {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        if let thread = takeLeaseThread() { pthread_join(thread, nil) }
        leaseReaders?.stop()
        for task in tasks.withLock({ $0.running.values }) { task.cancel() }
        await store.close()
        eventSink.finish()
    }

    func spawn(_ body: @escaping @Sendable () async throws -> Void) {
        // Created with the lock held: the task's own removal, which takes the lock, comes after.
        tasks.withLock { tasks in
            let key = tasks.next
            tasks.next += 1
            tasks.running[key] = Task {
                defer { _ = self.tasks.withLock { $0.running.removeValue(forKey: key) } }
                do { try await body() } catch {
                    if self.running.load(ordering: .relaxed) { self.logger.info("membership task of \(self.node) ended: \(error)") }
                }
            }
        }
    }

    // MARK: Configuration

    /// Applies every configuration the store holds, as it changes (NEW-CONFIG).
    private func followConfiguration() async throws {
        // The coordination session ended (expired): this node can no longer follow the
        // configuration, and the CM removes it (its registration went with the session). It
        // behaves as removed until it has rejoined.
        func sessionLost() {
            if running.load(ordering: .relaxed), !isLeaving {
                stopServing(engine.configuration.id, because: "\(node) lost its coordination session")
            }
        }
        while running.load(ordering: .relaxed) {
            let stored: StoredData, watch: CoordinationWatch
            do {
                (stored, watch) = try await store.getAndWatch(paths.configuration)
            } catch .sessionExpired {
                return sessionLost()
            }
            try await apply(try ConfigurationRecord.decode(stored.data))
            if await watch.event() == .sessionEnded { return sessionLost() }
        }
    }

    /// A removed node (or one that lost its session, so may be removed unseen) serves nothing
    /// more: fenced, its poller stopped, its transactions fail; it must rejoin as a new member.
    private func stopServing(_ id: ConfigurationID, because reason: String) {
        let first = state.withLock { state -> Bool in
            defer { state.stoppedServing = true }
            return !state.stoppedServing
        }
        guard first else { return }
        let interval = Double(options.renewalIntervalNanoseconds) / 1e6
        let lateAt = lateRenewalAt.load(ordering: .relaxed)
        let late = lateAt == 0 ? "none late"
            : "the latest late by \(String(format: "%.1f", Double(lateRenewalGap.load(ordering: .relaxed)) / 1e6 - interval)) ms, \((monotonicNanoseconds() &- lateAt) / 1_000_000) ms ago"
        logger.info("\(reason): it stops serving and must rejoin (its lease renewals, every \(String(format: "%.1f", interval)) ms: \(late))")
        // A CM among them grants no more leases: its successor's grants alone count.
        managerFlag.store(false, ordering: .releasing)
        // Nor does it renew its own: a configuration that lists it again (one committed before
        // the CM saw it stop) finds it silent, and the CM removes it instead of waiting for it.
        // (The thread ends at its next round; not joined here, which may run on it.)
        leasesHalted.store(true, ordering: .releasing)
        engine.setFenced(true)
        engine.stop()
        // Out of the election and the registrations too: a removed node must neither become the
        // CM nor be taken for a node asking to join. Only then `mustRejoin`: whoever sees it finds
        // the engine stopped (seen: the lost-session test read it between the flag and
        // engine.stop, and found the engine running) and this incarnation's registration gone,
        // so that the next one's, at the same path, is not deleted in its place (seen: an
        // embedded node that rejoined at once was never admitted).
        let election = state.withLock({ $0.electionNode })
        let registration = paths.members + "/\(node)"
        spawn {
            if let election { try? await self.store.delete(election, expectedVersion: nil) }
            try? await self.store.delete(registration, expectedVersion: nil)
            self.state.withLock { $0.mustRejoin = true }
            self.eventSink.yield(.mustRejoin(id))
        }
    }

    /// The coordination store this node's membership uses (for tests that end its session).
    package var coordinationStore: any CoordinationStore { store }

    /// Moves the engine to `configuration` and any newer one seen meanwhile (NEW-CONFIG), one
    /// at a time, in order: the configuration watch, a lease refresh and the CM's own changes call
    /// this from different tasks; whichever comes while another drives the moves leaves its
    /// configuration for that one. A configuration that removes members is applied through
    /// transaction-state recovery (``recover(into:removed:)``).
    func apply(_ configuration: Configuration) async throws {
        newest.withLock { newest in
            if newest.map({ configuration.id > $0.id }) ?? true { newest = configuration }
        }
        newestSeen.max(configuration.id.rawValue, ordering: .acquiringAndReleasing)
        drive()
    }

    /// Starts the task that moves the engine, unless it runs. The moves run in a task of their
    /// own, never in the caller's: a recovery can wait for members for as long as it takes a newer
    /// configuration to arrive, and the caller may be the one to bring it (a lease refresh that
    /// finds the CM silent; seen over ZooKeeper: a refresh that drove a recovery waiting for the
    /// dead CM never withdrew its candidacy, and the failover took the 4 s session timeout).
    private func drive() {
        guard !driving.exchange(true, ordering: .acquiringAndReleasing) else { return }
        spawn {
            try await withTaskExecutorPreference(self.reconfigurationExecutor) {
                try await self.driveMoves()
            }
        }
    }

    /// The loop of ``drive()``'s task.
    private func driveMoves() async throws {
        while self.running.load(ordering: .relaxed) {
            do {
                while let next = self.pendingConfiguration() {
                    try await self.move(to: next)
                    if self.engine.configuration.id < next.id, self.pendingConfiguration()?.id == next.id {
                        // The move did not happen: its recovery was abandoned for a newer
                        // configuration this node has not seen yet. Let the task that brings
                        // it run (the embedded store's calls never suspend, so without a
                        // pause this loop, when it ran in the cooperative pool, kept both
                        // threads of a 2-thread pool, and the watches that would bring the
                        // newer one never ran: seen as a hang of the recovery test after two
                        // nodes failed at once; on the reconfiguration thread it would still
                        // spin at nice -10 against the pool thread that runs those watches).
                        try await Task.sleep(for: .milliseconds(1))
                    }
                }
            } catch {
                // A failed store call or region file: try again shortly (the newest
                // configuration stays pending).
                self.logger.warning("\(self.node) could not move to the newest configuration yet: \(error)")
                try await Task.sleep(for: .milliseconds(100))
                continue
            }
            self.driving.store(false, ordering: .releasing)
            // One that came after the last look and before the flag was cleared.
            guard self.pendingConfiguration() != nil, !self.driving.exchange(true, ordering: .acquiringAndReleasing) else { return }
        }
        self.driving.store(false, ordering: .releasing)
    }

    /// The newest configuration seen, and whether a task is moving the engine.
    let newest = Mutex<Configuration?>(nil)
    private let driving = Atomic<Bool>(false)

    /// The newest configuration seen, if the engine is not in it yet (and this node serves).
    func pendingConfiguration() -> Configuration? {
        guard running.load(ordering: .relaxed), let next = newest.withLock({ $0 }), next.id > engine.configuration.id else {
            return nil
        }
        let (stoppedServing, passedOver) = state.withLock { ($0.stoppedServing, $0.passedOver) }
        guard !stoppedServing, passedOver.map({ next.id > $0 }) ?? true else { return nil }
        return next
    }

    private func move(to configuration: Configuration) async throws {
        let notAddedYet = state.withLock { state -> Bool in
            if configuration.contains(node) {
                state.listedOnce = true
                return false
            }
            guard state.joining, !state.listedOnce else { return false }
            state.passedOver = configuration.id
            return true
        }
        if notAddedYet { return }
        guard configuration.contains(node) else {
            stopServing(configuration.id, because: "\(node) is not in \(configuration.id)")
            return
        }
        for member in configuration.members where member.node != node && !engine.configuration.contains(member.node) {
            try connect(member)
            manager.memberReconnected(member.node)
            // Over verbs (where it drops every connection to the node): said, so that a log shows
            // each time this node reconnected to a member that joined.
            if leaseReaders != nil { logger.info("\(node) connected to \(member.node), which \(configuration.id) adds") }
        }
        let removed = engine.configuration.members.map(\.node).filter { !configuration.contains($0) }
        // A region added on demand goes through the recovery barrier too: every member routes
        // the region before any commit resumes, so its primary's first COMMIT-BACKUP never
        // reaches a backup that does not know it, and no member reads an address in it first.
        let addsRegions = configuration.regions.contains { engine.configuration.placement(of: $0.region) == nil }
        // So does a configuration that adds a member (the joining node included): a member that
        // has not applied it yet refuses the new member's records, and a COMMIT-BACKUP refused
        // is a committed write missing on a backup, unseen by its coordinator (seen: a node of an
        // embedded cluster that rejoined committed an allocation at once, and one backup, still
        // in the configuration before, refused its COMMIT-BACKUP).
        let addsMembers = state.withLock { $0.joining }
            || configuration.members.contains { !engine.configuration.contains($0.node) }
        if engine.configuration.keepsRouting(in: configuration) && !addsRegions && !addsMembers {
            try engine.apply(configuration, adding: try newRegions(in: configuration))
            // Blocked by a recovery this configuration superseded after it was applied here.
            engine.unblockCommits()
            eventSink.yield(.configurationApplied(configuration.id))
        } else {
            // Nodes removed or added, or regions given new backups (a node joined, or replaced a
            // lost replica): records of the old routing are drained and decided first.
            guard try await recover(into: configuration, removed: removed) else { return }
        }
        state.withLock { $0.joining = false }
        if configuration.manager == node, !isManager { becomeManager() }
        startCopies(in: configuration)
    }

    /// DATA RECOVERY: copies, in the background, every region `configuration` makes this node a
    /// new backup of; once a copy is complete, the configuration no longer marks it copying (a
    /// compare-and-set in the store, then applied like any configuration).
    private func startCopies(in configuration: Configuration) {
        for placement in configuration.regions where placement.copying.contains(node) {
            let region = placement.region
            guard state.withLock({ $0.copyingRegions.insert(region).inserted }) else { continue }
            let primary = placement.primary
            spawn {
                defer { _ = self.state.withLock { $0.copyingRegions.remove(region) } }
                // Whether the region's primary changed or this node no longer copies it, in the
                // newest configuration seen, or, before any was seen (a node starting in a
                // configuration where it copies: `newest` is set by the first apply, which may
                // come after the copy began), in the one the engine is in. (Taking no newest
                // configuration for a superseded copy abandoned such copies at once: after a
                // restart a region stayed marked copying, seen in the crash-restart test.)
                let superseded = { @Sendable () -> Bool in
                    guard let now = (self.newest.withLock({ $0 }) ?? self.engine.configuration).placement(of: region) else { return true }
                    return now.primary != primary || !now.copying.contains(self.node)
                }
                var failures = 0
                let report: DataRecoveryReport
                while true {
                    do {
                        report = try await self.engine.copyRegion(region, from: primary, pace: self.options.copyPace, shouldStop: superseded)
                        break
                    } catch {
                        // A read of the primary failed (it may be failing itself: then a new
                        // configuration supersedes this copy) or this node stops. Otherwise the
                        // copy starts again, so that the region does not stay short of a replica.
                        guard self.running.load(ordering: .relaxed), !superseded() else { throw error }
                        failures += 1
                        self.logger.warning("\(self.node) copy of \(region) from \(primary) failed (\(error)); attempt \(failures + 1) follows")
                        try await Task.sleep(for: .milliseconds(min(1_000, 10 << min(failures, 7))))
                    }
                }
                self.logger.info("\(self.node) \(report)")
                let node = self.node
                let committed = try await ConfigurationRecord.change(self.engine.configuration.cluster, in: self.store) { current in
                    guard let index = current.regions.firstIndex(where: { $0.region == region }),
                          current.regions[index].primary == primary, current.regions[index].copying.contains(node) else { return nil }
                    var next = current
                    next.regions[index].copying.removeAll { $0 == node }
                    return next
                }
                if let committed {
                    try await self.apply(committed)
                    self.announce(committed.id)
                }
            }
        }
    }

    /// This node's replicas of regions `configuration` newly places on it, opened.
    func newRegions(in configuration: Configuration) throws -> [Region] {
        let held = Set(engine.configuration.regions.filter { $0.replicas.contains(node) }.map(\.region))
        return try configuration.regions.filter { $0.replicas.contains(node) && !held.contains($0.region) }.map(openRegion)
    }

    /// Stops this node's membership as SIGKILL would: the lease thread stops renewing, the watches
    /// end, and the store session is left to expire (not closed). For ``Cluster/crash(_:)``.
    package func crash() {
        running.store(false, ordering: .releasing)
        haltLeases()
        leaseReaders?.stop()
        for task in tasks.withLock({ $0.running.values }) { task.cancel() }
        eventSink.finish()
    }

    // MARK: Election

    /// The lowest election node is the CM; the others watch their predecessor.
    private func elect() async throws {
        guard let mine = state.withLock({ $0.electionNode }) else { return }
        let name = String(mine.split(separator: "/").last!)
        while running.load(ordering: .relaxed) {
            let candidates = try await store.children(paths.election)
            guard let index = candidates.firstIndex(of: name) else {
                // Our session ended (expired): we are out of the running.
                return
            }
            if index == 0 {
                try await manager.takeOver()
                return
            }
            let (version, watch) = try await store.existsAndWatch(paths.election + "/" + candidates[index - 1])
            if version == nil { continue }
            if await watch.event() == .sessionEnded { return }
        }
    }

    let candidateNodes = Mutex<Set<NodeID>>([])
    func candidatesContain(_ node: NodeID) -> Bool { candidateNodes.withLock { $0.contains(node) } }

    func becomeManager() {
        guard !managerFlag.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // The CM grants leases; it holds none it could lose.
        engine.setFenced(false)
        logger.info("\(node) is the configuration manager")
        eventSink.yield(.becameManager(engine.configuration.id))
        spawn { try await self.manager.watchRegistrations() }
        spawn { try await self.manager.watchRegionRequests() }
    }

    // MARK: Leases

    /// Stops renewing leases without ending the store session, as a node that hangs (SIGSTOP)
    /// would: for failure-detection tests.
    package func haltLeases() {
        let thread = takeLeaseThread()
        leasesHalted.store(true, ordering: .releasing)
        if let thread { pthread_join(thread, nil) }
    }

    /// The lease thread's handle, taken out so that whoever joins it (`stop()`, `haltLeases()`)
    /// is the only one: a later `crash()` of a stopped service (`Cluster.abandon()`) joined it
    /// again, a crash in pthread_join.
    private func takeLeaseThread() -> pthread_t? {
        leaseThread.withLock { thread in
            defer { thread = nil }
            return thread
        }
    }
    private let leasesHalted = Atomic<Bool>(false)
    /// The latest round of the lease thread that came more than two renewal intervals after the
    /// one before (when, monotonic ns, 0: none; and the time between them): said when this node
    /// learns it was removed, since a lease thread that did not run explains a removal of a live
    /// node.
    private let lateRenewalAt = Atomic<UInt64>(0)
    private let lateRenewalGap = Atomic<UInt64>(0)
    /// The kernel's id of the lease thread (0 until it started). For tests, which pin it to a CPU.
    package var leaseThreadID: Int32 { leaseThreadKernelID.load(ordering: .acquiring) }
    private let leaseThreadKernelID = Atomic<Int32>(0)
    /// Whether this service still holds its lease thread's handle (to join it once). For tests.
    package var holdsLeaseThread: Bool { leaseThread.withLock { $0 != nil } }
    /// Whether this node, as CM, has seen `member` renew its lease (so that its lease, not the
    /// grace period of a starting member, bounds how soon its failure is detected).
    package func hasSeenRenewing(_ member: NodeID) -> Bool { manager.hasSeenRenewing(member) }

    private final class ThreadStart: @unchecked Sendable {
        // Handed to exactly one thread.
        let service: MembershipService
        init(_ service: MembershipService) { self.service = service }
    }

    /// Starts the lease thread; the node starts fenced (``start(joining:)``) and the thread lifts
    /// the fence at the CM's first grant.
    private func startLeaseThread() {
        var thread = pthread_t()
        let start = Unmanaged.passRetained(ThreadStart(self)).toOpaque()
        precondition(pthread_create(&thread, nil, { raw in
            let start = Unmanaged<ThreadStart>.fromOpaque(raw!).takeRetainedValue()
            // Leases must not wait behind anything: real-time priority where allowed (root).
            var parameter = sched_param()
            parameter.sched_priority = 10
            _ = pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameter)
            // Named, so that a profile or a scheduler trace shows where a lease thread waited
            // (and whose it is: an embedded cluster runs one per node).
            Thread.current.name = "lease-\(start.service.node)"
            start.service.leaseThreadKernelID.store(HostPauses.currentThreadID, ordering: .releasing)
            start.service.leaseLoop()
            return nil
        }, start) == 0)
        leaseThread.withLock { $0 = thread }
    }

    private func leaseLoop() {
        let lease = options.lease.wholeNanoseconds
        let interval = options.renewalIntervalNanoseconds
        let expiry = options.expiryNanoseconds
        let ownWord = engine.leaseWord(at: LeaseWords.counterOffset)
        let grantWord = engine.leaseGrantWord  // written by the CM
        let announcedWord = engine.leaseWord(at: LeaseWords.announcedOffset)  // NEW-CONFIG, written by the CM
        var watch = ConfigurationManager.LeaseWatch(lease: lease, expiry: expiry)
        var lastGrant = (value: grantWord.pointee.load(ordering: .acquiring), at: monotonicNanoseconds())
        var lastRefresh = lastGrant.at
        var fenced = true  // as start(joining:) left the engine
        var members = engine.configuration.id
        mapManagerLeasePage(in: engine.configuration)
        var counter: UInt64 = 0
        var previous = monotonicNanoseconds()
        // Witnesses of this host's CPUs, where the members share it: shared memory (no lease
        // readers). Not over verbs, even between the nodes of one host: the one soft-RoCE run
        // with them there failed (a rejoining verbs client removed again, a failure seen without
        // them too; whether their wakeups, costly in an emulated guest, played a part is not
        // known), and the stage passed without them.
        let hostPauses = options.excusesHostPauses && leaseReaders == nil ? HostPauses.acquire() : nil
        defer { if hostPauses != nil { HostPauses.release() } }
        while running.load(ordering: .relaxed), !leasesHalted.load(ordering: .acquiring) {
            counter &+= 1
            ownWord.pointee.store(counter, ordering: .releasing)
            let now = monotonicNanoseconds()
            // This thread itself did not run for half an expiry (the host stalled the CPU, or the
            // scheduler): the members' counters may not have moved for the same reason, and the
            // threads that move them may not have run yet. Restart their clocks instead of blaming
            // them for this thread's pause.
            let gap = now - previous
            // So did one of this host's CPUs, and with it the lease threads on it (`HostPauses`).
            let stalled = gap > expiry / 2 || hostPauses?.paused(since: previous, now: now, longerThan: expiry / 2) == true
            if gap > 2 * interval {
                lateRenewalGap.store(gap, ordering: .relaxed)
                lateRenewalAt.store(now, ordering: .relaxed)
            }
            previous = now
            let configuration = engine.configuration
            // The CM watches the members of the configuration it is moving into too: one that
            // fails (or never starts) before the recovery barrier of that configuration is
            // removed by the next one, instead of holding every member at the barrier for ever.
            // (The lock is taken only while a move is under way.)
            let moving = newestSeen.load(ordering: .acquiring) > configuration.id.rawValue && isManager
                ? newest.withLock { $0 }.flatMap { $0.id > configuration.id ? $0 : nil } : nil
            if configuration.id != members {
                members = configuration.id
                manager.forgetNodes(outside: configuration, watch: &watch)
                mapManagerLeasePage(in: configuration)
            }
            if isManager {
                manager.grantLeases(counter: counter, now: now, stalled: stalled, in: configuration, movingTo: moving, watch: &watch)
            } else {
                // A configuration newer than any seen was announced: fetch it. (One already seen
                // may still be being applied, e.g. through a recovery: no need to fetch it again.)
                if announcedWord.pointee.load(ordering: .acquiring) > max(configuration.id.rawValue, newestSeen.load(ordering: .acquiring)) {
                    refresh(suspectManager: nil)
                }
                let grant = grantWord.pointee.load(ordering: .acquiring)
                if grant != lastGrant.value {
                    lastGrant = (grant, now)
                    if fenced {
                        fenced = false
                        engine.setFenced(false)
                    }
                } else {
                    // The lease runs from the CM's last grant, whatever this thread's own delays:
                    // past it, this node may have been removed, and commits wait (fenced).
                    if now - lastGrant.at > lease, !fenced {
                        fenced = true
                        engine.setFenced(true)
                    }
                    if stalled {
                        lastRefresh = now
                    } else if now - lastGrant.at > expiry, now - lastRefresh > expiry {
                        // No renewal from the CM: it failed, or we were removed. Ask the store.
                        lastRefresh = now
                        refresh(suspectManager: configuration.manager)
                    }
                }
            }
            usleep(UInt32(max(1, interval / 1_000)))
        }
    }

    /// Maps the CM's lease page now, while its process lives: a lease page goes with its process,
    /// so a CM that dies before a member first reads its counter would leave it unreadable, and
    /// an unreadable counter is not taken for a silent CM (see `refresh`), which would leave the
    /// members waiting for its coordination session to expire (seconds) instead of a lease.
    /// (Shared memory only: over verbs a dead CM's counter is unreadable and read as silent, and
    /// reading it here would only start a reader thread.)
    private func mapManagerLeasePage(in configuration: Configuration) {
        guard leaseReaders == nil else { return }
        if let manager = configuration.manager, manager != node { _ = leaseCounter(of: manager) }
    }

    /// Deletes the election nodes of the nodes `matching` selects.
    func withdrawCandidates(_ matching: (NodeID) -> Bool) async {
        guard let names = try? await store.children(paths.election) else { return }
        for name in names {
            guard let data = try? await store.get(paths.election + "/" + name).data,
                  let raw = UInt16(String(decoding: data, as: UTF8.self)), matching(NodeID(rawValue: raw)) else { continue }
            try? await store.delete(paths.election + "/" + name, expectedVersion: nil)
        }
    }

    /// `node`'s lease counter, read one-sidedly from its lease page; nil when it cannot be read (a
    /// dead peer on verbs). Over shared memory a read of the mapping; on a transport whose read
    /// of a dead peer blocks (verbs), the value its own reader thread last read
    /// (``LeaseCounterReaders``), so that this never blocks the lease thread.
    func leaseCounter(of node: NodeID) -> UInt64? {
        if let readers = leaseReaders { return readers.counter(of: node) }
        return readLeaseCounter(of: node)
    }

    func readLeaseCounter(of node: NodeID) -> UInt64? {
        Self.readLeaseCounter(of: node, through: engine.transportHandle)
    }

    /// One one-sided read of `node`'s lease counter, however long it takes.
    static func readLeaseCounter(of node: NodeID, through transport: any Transport) -> UInt64? {
        var value: UInt64 = 0
        let read: Void? = try? withUnsafeMutableBytes(of: &value) { (bytes) throws(TransportError) in
            try transport.read(from: node, LeaseWords.counterAddress(of: node), into: bytes)
        }
        return read == nil ? nil : value
    }

    /// NEW-CONFIG: the CM writes the new configuration id into every member's lease page with a
    /// one-sided write; a member's lease thread that sees an id above its own fetches the
    /// configuration from the store at once (the store's watch delivers it too).
    func announce(_ id: ConfigurationID) {
        for member in engine.configuration.members where member.node != node {
            var value = id.rawValue
            _ = try? withUnsafeBytes(of: &value) { (bytes) throws(TransportError) in
                try engine.transportHandle.write(to: member.node, LeaseWords.announcedAddress(of: member.node), from: bytes)
            }
        }
    }

    /// Our lease from the CM expired: re-read the configuration; if the CM itself is silent and
    /// we are next in the election, take its place.
    private func refresh(suspectManager manager: NodeID?) {
        // An atomic flag, not the state lock: this runs on the real-time lease thread.
        let bit: UInt8 = manager == nil ? 1 : 2
        guard refreshing.bitwiseOr(bit, ordering: .acquiringAndReleasing).oldValue & bit == 0 else { return }
        spawn {
            defer { self.refreshing.bitwiseAnd(~bit, ordering: .releasing) }
            let (configuration, _) = try await ConfigurationRecord.read(self.engine.configuration.cluster, from: self.store)
            try await self.apply(configuration)
            guard configuration.contains(self.node), let manager, manager != self.node, configuration.manager == manager else { return }
            // Is the CM's own lease counter still moving? Over shared memory an unreadable counter
            // proves nothing (a lease page goes with its process: `mapManagerLeasePage`), so it
            // reads as moving. Over verbs a read fails only once the queue pair gives up on the
            // peer: a CM whose counter cannot be read does not answer, as silent as one that
            // stopped. (Those reads may wait that long: each on a thread of its own.)
            if self.leaseReaders != nil {
                if let first = try await onThreadOfItsOwn({ self.readLeaseCounter(of: manager) }) {
                    try await Task.sleep(for: self.options.lease)
                    let second = try await onThreadOfItsOwn { self.readLeaseCounter(of: manager) }
                    guard second == nil || second == first else { return }
                }
            } else {
                let first = self.leaseCounter(of: manager) ?? 0
                try await Task.sleep(for: self.options.lease)
                let second = self.leaseCounter(of: manager) ?? 1
                guard first == second else { return }
            }
            // The CM is silent: if we are next in line, delete its election node; our watch on it
            // then makes us the CM, which removes it from the configuration.
            let candidates = try await self.store.children(self.paths.election)
            var owners: [(String, NodeID)] = []
            for name in candidates {
                if let data = try? await self.store.get(self.paths.election + "/" + name).data, let raw = UInt16(String(decoding: data, as: UTF8.self)) {
                    owners.append((name, NodeID(rawValue: raw)))
                }
            }
            self.candidateNodes.withLock { $0 = Set(owners.map(\.1).filter { $0 != manager }) }
            // The next live member after the CM in election order takes over; candidates that are
            // not members any more (removed, waiting to rejoin) are skipped.
            guard let managerIndex = owners.firstIndex(where: { $0.1 == manager }),
                  let successor = owners[(managerIndex + 1)...].first(where: { configuration.contains($0.1) }),
                  successor.1 == self.node else { return }
            self.logger.info("\(self.node) takes over from silent CM \(manager)")
            // Out go the CM's candidacy and those of non-members ahead of us (their sessions may
            // live on for seconds), so that our election watch fires now.
            await self.withdrawCandidates { $0 == manager || (!configuration.contains($0) && $0 != self.node) }
        }
    }
}

/// As CM: the time of the last lease renewal written to each member, read when a member is
/// removed (how long to wait until its lease has run out).
///
/// `@unchecked Sendable`: one atomic per node in a block allocated at init and freed at deinit.
final class GrantTimes: @unchecked Sendable {
    private let times: UnsafeMutablePointer<Atomic<UInt64>>

    init() {
        times = .allocate(capacity: NodeID.limit)
        for index in 0..<NodeID.limit { (times + index).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        times.deinitialize(count: NodeID.limit)
        times.deallocate()
    }

    func record(_ node: NodeID, at time: UInt64) {
        guard node.index < NodeID.limit else { return }
        times[node.index].store(time, ordering: .releasing)
    }

    func last(_ node: NodeID) -> UInt64 {
        node.index < NodeID.limit ? times[node.index].load(ordering: .acquiring) : 0
    }
}

/// Runs `body`, which may block for long (a one-sided read of a dead peer over verbs, an msync of
/// whole regions), on a new thread, and waits for it without holding a thread of the cooperative
/// pool.
package func onThreadOfItsOwn<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
    }
}
