import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMembership
import GranaryMemory
import Logging
import Synchronization
import SystemPackage

/// REJOIN within this process, for a node the configuration manager removed while it was alive
/// (a false suspicion: its lease thread was held off, or its lease lapsed while its host was
/// loaded): such a node stops serving and must rejoin, as a node process does when it is
/// restarted. This watches the cluster's membership services and starts the next incarnation of
/// a node that must rejoin, through `incarnate`:
/// - a node of an embedded cluster (``embedded(configuration:options:membership:logger:makeSession:)``);
/// - the client of a connection to node processes (`Cluster.connect(file:)` with ZooKeeper): its
///   old membership service is stopped, a new storage (over verbs: the same transport and lease
///   page) and engine join the stored configuration as a client again, and its ``Node`` runs
///   transactions on the new engine once the manager has admitted it.
/// A node crashed on purpose (``Cluster/crash(_:)``) stays down, as a killed process that nobody
/// restarts.
final class Rejoin: Sendable {
    /// Starts `node`'s next incarnation in `cluster`, in place of the one whose membership
    /// service, `old`, must rejoin.
    typealias Incarnate = @Sendable (_ node: NodeID, _ old: MembershipService, _ cluster: Cluster) async throws -> Void
    private let incarnate: Incarnate
    private let logger: Logger
    private struct State {
        var crashed = Set<NodeID>()
        var rejoining = Set<NodeID>()
        var stopped = false
        var watcher: Task<Void, Never>?
    }
    private let state = Mutex(State())

    init(logger: Logger, incarnate: @escaping Incarnate) {
        self.logger = logger
        self.incarnate = incarnate
    }

    /// Watches `cluster`'s membership services: one that must rejoin starts the node's next
    /// incarnation. (A poll every 10 ms: the services' event streams belong to their users.)
    func start(_ cluster: Cluster) {
        let task = Task.detached { [weak cluster] in
            while !Task.isCancelled {
                guard let cluster else { return }
                for service in cluster.membership where service.mustRejoin && !service.isLeaving {
                    let node = service.node
                    let begin = self.state.withLock { state -> Bool in
                        guard !state.stopped, !state.crashed.contains(node) else { return false }
                        return state.rejoining.insert(node).inserted
                    }
                    guard begin else { continue }
                    do {
                        try await self.incarnate(node, service, cluster)
                    } catch {
                        self.logger.error("\(node) could not rejoin the cluster: \(error); trying again in 1 s")
                        try? await Task.sleep(for: .seconds(1))
                    }
                    _ = self.state.withLock { $0.rejoining.remove(node) }
                }
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
        state.withLock { $0.watcher = task }
    }

    /// `node` was crashed on purpose: it does not rejoin.
    func crashed(_ node: NodeID) {
        _ = state.withLock { $0.crashed.insert(node) }
    }

    /// No rejoin starts from now on; one under way ends first.
    func stop() async {
        let watcher = state.withLock { state -> Task<Void, Never>? in
            state.stopped = true
            return state.watcher
        }
        watcher?.cancel()
        await watcher?.value
    }

    /// REJOIN for the nodes of an embedded cluster (``Cluster/local(nodes:replicas:directory:options:)``
    /// with a configuration manager): the node's old membership service is stopped, its old
    /// replicas are set aside (superseded: the members recovered without it), a new storage reuses
    /// its mailbox file (cleared in place, so the other nodes' mappings of it stay valid, and their
    /// channels to it reopen) and makes a new lease page, a new engine runs the stored
    /// configuration with the node added, and a new membership service joins (`start(joining:
    /// true)`): the manager adds it with new backups of the regions short of replicas, which it
    /// copies from their primaries. Its ``Node`` then runs transactions on the new engine.
    static func embedded(configuration root: Configuration, options: ClusterOptions, membership: MembershipOptions, logger: Logger,
                         makeSession: @escaping @Sendable () throws -> any CoordinationStore) -> Rejoin {
        Rejoin(logger: logger) { node, old, cluster in
            guard let index = cluster.nodes.firstIndex(where: { $0.id == node }),
                  let me = root.members.first(where: { $0.node == node }) else { return }
            logger.notice("\(node) was removed from the configuration while it ran: it rejoins as a new incarnation")
            await old.stop()
            let home = try NodeStorage.directory(of: me)
            // Its replicas are superseded: the members recovered without it and hold every committed
            // write; regions placed on it from now on start empty and are copied from their primaries.
            home.setAsideRegions()
            let store = try makeSession()
            var (stored, _) = try await ConfigurationRecord.read(root.cluster, from: store)
            stored = Cluster.resolvingEndpoints(of: stored, against: cluster.directory)
            if stored.contains(node) {
                stored = try await ConfigurationRecord.waitForRemoval(of: node, from: stored, in: store, timeout: .seconds(30))
            }
            stored.members.append(me)
            stored.members.sort { $0.node < $1.node }
            let storage = try NodeStorage(node: node, configuration: stored, ringCapacity: options.ringCapacity)
            let engine = try storage.makeEngine(options: options.engine, logger: logger)
            // Fenced before the cluster hands it out (`rejoined`): until the CM admits it, its
            // configuration (the stored one with itself added) is its own guess.
            engine.setFenced(true)
            let size = stored.regionSize, regionLogger = logger
            let service = MembershipService(
                engine: engine, store: store, options: membership, logger: logger,
                connect: { member in try storage.connect(member) },
                openRegion: { placement in try storage.openRegionWhileServing(placement, size: size, logger: regionLogger) })
            storage.spares.start(count: membership.spareRegions, logger: logger)
            cluster.rejoined(index, engine: engine, service: service, spares: storage.spares)
            try await service.start(joining: true)
        }
    }
}
