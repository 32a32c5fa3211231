import Foundation
import GranaryConfiguration
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Logging
import Synchronization
import SystemPackage

/// Settings of an embedded cluster beyond its shape.
public struct ClusterOptions: Sendable {
    /// Regions each node is primary of.
    public var regionsPerNode: Int = 2
    /// Size of every data region in bytes (a power of two, at least 1 MiB).
    public var regionSize: Int = RegionFormat.defaultSize
    /// Capacity of each message ring (a power of two, at least 4 KiB).
    public var ringCapacity: Int = 256 << 10
    /// The transaction engine's tunables, the same for every node.
    public var engine = EngineOptions()
    /// The configuration manager (election, leases, failure detection, FaRM's transaction and
    /// data recovery) through ``coordination``, when set; nil (the default) runs the nodes on
    /// their static configuration.
    ///
    /// Off by default for an embedded cluster: its nodes share one process, so a real failure
    /// takes them all, and reopening the directory recovers (restart recovery). Membership adds
    /// recovery from the failure of one node, which within one process only ``Cluster/crash(_:)``
    /// causes; a node it removes while the node runs (a false suspicion, if an overloaded machine
    /// starves the lease threads) rejoins within the process as a new incarnation (its ``Node``
    /// runs on a new engine, its replicas are copied back). Turn it on to test or measure recovery
    /// (`granary bench --crash` and `granary check run --nemesis crash` do). Node processes
    /// (`granary node --coordination`) run it through ZooKeeper, where a removed node rejoins.
    public var membership: MembershipOptions?
    /// How long a client of a coordinated cluster (`Cluster.connect`) waits to be admitted (a
    /// configuration lists it and its lease is granted): when it connects, and each time it joins
    /// again after its removal. 30 s by default; a cluster whose recoveries take seconds each (node
    /// processes in an emulated soft-RoCE guest) needs more.
    public var admissionTimeout: Duration = .seconds(30)
    /// The coordination store the configuration manager agrees through.
    public var coordination: CoordinationChoice = .embedded
    /// Where the nodes log (at info level or below).
    public var logger: Logger = Logger(label: "granary")

    /// The defaults: 2 regions per node of `RegionFormat.defaultSize` bytes (64 MiB), message
    /// rings of 256 KiB, the engine's default options, no configuration manager, and a logger
    /// labelled `granary`.
    public init() {}
}

/// Where a cluster's nodes agree on the configuration.
public enum CoordinationChoice: Sendable, Equatable {
    /// An `EmbeddedCoordinationService` in this process.
    case embedded
    /// A ZooKeeper ensemble, e.g. "127.0.0.1:2181".
    case zookeeper(String)

    /// Parses `embedded` or `zookeeper://host:port[,host:port...]` (as a cluster file's
    /// `coordination` is checked: `ClusterFile.zooKeeperAddress(_:)`).
    public init?(_ text: String) {
        if text == "embedded" { self = .embedded; return }
        guard let hosts = try? ClusterFile.zooKeeperAddress(text) else { return nil }
        self = .zookeeper(hosts)
    }
}

/// A Granary cluster: its nodes, their configuration, and their region files.
///
/// ```swift
/// let cluster = try await Cluster.local()
/// let node = cluster.nodes[0]
/// let account = try await node.transaction { try $0.allocate(Int64(100)) }
/// try await node.transaction { tx in
///     try tx.write(account, try tx.read(account, as: Int64.self) + 1)
/// }
/// try await cluster.shutdown()
/// ```
public final class Cluster: Sendable {
    /// The nodes this process runs: every node of a local cluster, indexed by its `NodeID`; the
    /// one client node of a connection (``connect(file:client:options:)``).
    public let nodes: [Node]
    /// The configuration the cluster started with, or the latest it added a region to (regions on
    /// demand, static configurations only). With a configuration manager the nodes move on from
    /// it: each engine's `configuration` is the one it is in.
    public var configuration: Configuration { regionAllocation?.current.withLock { $0 } ?? startingConfiguration }
    private let startingConfiguration: Configuration
    /// Adds regions when a node's are full (static configurations; nil with a configuration manager).
    private let regionAllocation: RegionAllocation?
    /// The directory holding one sub-directory of region files per node, and `cluster.json`.
    public let directory: FilePath
    private let removeOnShutdown: Bool
    /// The embedded coordination store, when the cluster runs a configuration manager.
    public let coordination: EmbeddedCoordinationService?
    /// Each node's membership service (empty without a configuration manager); a node that
    /// rejoined has a new one.
    public var membership: [MembershipService] { services.withLock { $0 } }
    private let services: Mutex<[MembershipService]>
    /// Rejoins the nodes of an embedded cluster, or the client of a connection, that the
    /// configuration manager removed while they ran.
    private let rejoin: Rejoin?

    /// What restart recovery found and did when this cluster was reopened from its files (nil for
    /// a new cluster).
    public let recovery: RestartRecovery.Report?

    /// The lock a client connection holds on its member's directory (-1 for a local cluster).
    private let clientLock: Int32
    /// Each node's spare region files (with a configuration manager), those of its former
    /// incarnations included.
    private let spares: Mutex<[SpareRegions]>
    /// Spare region files ready on the nodes, and taken for new replicas so far (all nodes).
    package var spareRegionCounts: (ready: Int, taken: Int) {
        spares.withLock { $0.reduce((0, 0)) { ($0.0 + $1.readyCount, $0.1 + $1.takenCount) } }
    }

    private init(nodes: [Node], configuration: Configuration, directory: FilePath, removeOnShutdown: Bool,
                 coordination: EmbeddedCoordinationService?, membership: [MembershipService],
                 recovery: RestartRecovery.Report?, regionAllocation: RegionAllocation?, clientLock: Int32 = -1,
                 spares: [SpareRegions] = [], rejoin: Rejoin? = nil) {
        self.spares = Mutex(spares)
        self.rejoin = rejoin
        self.clientLock = clientLock
        self.recovery = recovery
        self.nodes = nodes
        self.startingConfiguration = configuration
        self.regionAllocation = regionAllocation
        self.directory = directory
        self.removeOnShutdown = removeOnShutdown
        self.coordination = coordination
        self.services = Mutex(membership)
    }

    /// Starts an embedded cluster of `nodes` nodes in this process over the shared-memory transport,
    /// every region replicated `replicas` times on distinct nodes.
    ///
    /// With a `directory` that already holds a cluster (its `cluster.json`), the cluster is reopened
    /// from its region files; otherwise a new one is created there (or in a temporary directory,
    /// removed at ``shutdown()``, when `directory` is nil: under `$TMPDIR` if set, else in memory,
    /// `/dev/shm`, where it is a tmpfs, else `/tmp`). Region files belong in memory, as FaRM's
    /// regions are in NVRAM: there a node keeps spare regions ready for the replicas recovery
    /// places on it (`MembershipOptions.spareRegions`), and no file system journal holds up a
    /// store into a region.
    ///
    /// With a configuration manager on the embedded store (``ClusterOptions/membership``), every
    /// configuration it commits is written to `cluster.json` before any node can act in it, so a
    /// reopen starts from the last one: the regions where recovery left them (promoted backups,
    /// regions added on demand). A node the manager had removed comes back as a new member: its
    /// old replica files are set aside (renamed `.removed`), and it gets new backups of the regions
    /// short of `replicas`, which it copies from their primaries once the manager runs again.
    ///
    /// - Throws: `ConfigurationError` for an impossible shape (more replicas than nodes),
    ///   `RegionError` for region files that cannot be created or opened.
    public static func local(nodes: Int = 3, replicas: Int = 3, directory: FilePath? = nil,
                             options: ClusterOptions = ClusterOptions()) async throws -> Cluster {
        guard nodes >= 1, nodes <= NodeID.limit else {
            throw ConfigurationError.invalid("a local cluster has 1 to \(NodeID.limit) nodes, not \(nodes)")
        }
        if let directory {
            _ = try RegionDirectory(directory)
            return try await local(nodes: nodes, replicas: replicas, root: directory, temporary: false, options: options)
        }
        // A temporary directory goes with a cluster that could not start, as with one shut down.
        let root = FilePath(try makeTemporaryDirectory())
        do {
            return try await local(nodes: nodes, replicas: replicas, root: root, temporary: true, options: options)
        } catch {
            try? FileManager.default.removeItem(atPath: root.string)
            throw error
        }
    }

    private static func local(nodes: Int, replicas: Int, root: FilePath, temporary: Bool,
                              options: ClusterOptions) async throws -> Cluster {
        let manifest = root.appending("cluster.json")
        var configuration: Configuration
        var createdManifest = false
        var lastRecovery: RestartRecovery.Report?
        /// Nodes of the cluster that the configuration manager had removed (see the reopen below).
        var removedNodes: [NodeID] = []
        if FileManager.default.fileExists(atPath: manifest.string) {
            let data = try Data(contentsOf: URL(fileURLWithPath: manifest.string))
            // Endpoints are relative to the cluster directory (an older cluster.json may hold
            // absolute ones, which stay as they are).
            configuration = Self.resolvingEndpoints(of: try JSONDecoder().decode(Configuration.self, from: data), against: root)
            // Members the CM removed are not listed; each left its directory, with its mailbox.
            let listed = Set(configuration.members.map(\.node))
            removedNodes = (0..<nodes).map { NodeID($0) }.filter { node in
                !listed.contains(node)
                    && FileManager.default.fileExists(atPath: root.appending(node.description).appending(RegionID.mailbox(of: node).fileName).string)
            }
            guard listed.allSatisfy({ $0.index < nodes }), listed.count + removedNodes.count == nodes else {
                throw ConfigurationError.invalid("\(manifest) describes \(configuration.members.count) nodes (\(configuration.members.map(\.node.description).joined(separator: ", "))\(removedNodes.isEmpty ? "" : "; removed: \(removedNodes.map(\.description).joined(separator: ", "))")), not \(nodes)")
            }
            // Replicas the CM placed whose nodes had not made them when the process stopped.
            for made in try NodeStorage.makeUnmadeReplicas(of: configuration) { options.logger.notice("\(made)") }
        } else {
            let ids = (0..<nodes).map { NodeID($0) }
            // cluster.json names each node's directory relative to itself, so the cluster
            // directory can move; this process uses the resolved paths.
            let stored = try Configuration(
                id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
                members: ids.map { Member(node: $0, endpoint: "shm:" + $0.description) },
                manager: ids.first,
                regions: Configuration.balancedPlacement(nodes: ids, regionsPerNode: options.regionsPerNode, replicas: replicas),
                regionSize: options.regionSize)
            let resolved = Self.resolvingEndpoints(of: stored, against: root)
            try Self.writeManifest(resolved, to: manifest, root: root)
            configuration = resolved
            createdManifest = true
        }
        let reopening = FileManager.default.fileExists(atPath: manifest.string) && !createdManifest
        if reopening, options.membership != nil, case .zookeeper(let address) = options.coordination {
            try await Self.checkStoredConfiguration(of: configuration, at: address, manifest: manifest)
        }
        var storage = try configuration.members.map {
            try NodeStorage(node: $0.node, configuration: configuration, ringCapacity: options.ringCapacity,
                            preservingLog: reopening, reopening: reopening)
        }
        var logger = options.logger
        logger[metadataKey: "cluster"] = "\(configuration.cluster)"
        if reopening {
            // Every node of this cluster restarts at once: recover the transactions in the logs
            // before anything serves (allocators are rebuilt after, when the engines start).
            // Removed nodes are not members: their logs and replicas were superseded when the
            // members recovered without them.
            let report = RestartRecovery.recover(
                configuration: configuration,
                nodes: storage.map { RestartRecovery.NodeFiles(node: $0.node, mailbox: $0.mailbox, replicas: $0.replicas) },
                logger: logger)
            lastRecovery = report
        }
        let recovered = configuration
        if !removedNodes.isEmpty {
            configuration = try Self.readmitting(removedNodes, to: configuration, root: root, replicas: replicas,
                                                 replenish: options.membership != nil, manifest: manifest, logger: logger)
        }
        if reopening, options.membership == nil, configuration.regions.contains(where: { !$0.copying.isEmpty }) {
            configuration = try Self.droppingCopies(of: configuration, root: root, manifest: manifest, logger: logger)
        }
        if configuration != recovered {
            storage = try configuration.members.map {
                try NodeStorage(node: $0.node, configuration: configuration, ringCapacity: options.ringCapacity)
            }
        }
        // Every node's transport reaches its peers through the peers' own mappings.
        for node in storage {
            for peer in storage where peer.node != node.node {
                for region in peer.replicas + [peer.mailbox.region, peer.leasePage] { try node.sharedMemory?.adopt(region, of: peer.node) }
            }
        }
        let engines = try storage.map { try $0.makeEngine(options: options.engine, logger: logger) }
        for engine in engines { engine.helpNeighbours(engines) }
        var coordination: EmbeddedCoordinationService?
        var services: [MembershipService] = []
        var spares: [SpareRegions] = []
        var rejoin: Rejoin?
        if let membershipOptions = options.membership {
            let makeSession: @Sendable () throws -> any CoordinationStore
            switch options.coordination {
            case .embedded:
                // The store's configuration is also the manifest's, written before any node can
                // see it, so that a reopen finds where recovery left the regions.
                let configurationPath = MembershipPaths(cluster: configuration.cluster).configuration
                let service = temporary ? EmbeddedCoordinationService() : EmbeddedCoordinationService { path, data throws(CoordinationError) in
                    guard path == configurationPath else { return }
                    do {
                        try Self.writeManifest(try ConfigurationRecord.decode(data), to: manifest, root: root)
                    } catch {
                        throw CoordinationError.backend("the configuration could not be written to \(manifest): \(error)")
                    }
                }
                coordination = service
                makeSession = { service.session() }
            case .zookeeper(let address):
                #if ZooKeeper
                makeSession = { try ZooKeeperStore(connectString: address, sessionTimeout: .seconds(4)) }
                #else
                throw ConfigurationError.invalid("the coordination store is ZooKeeper at \(address), which this build of Granary leaves out (depend on it with the package trait ZooKeeper)")
                #endif
            }
            let bootstrapSession = try makeSession()
            try await ConfigurationRecord.bootstrap(configuration, in: bootstrapSession)
            await bootstrapSession.close()
            for (index, engine) in engines.enumerated() {
                let node = storage[index]
                let size = configuration.regionSize, regionLogger = logger
                node.spares.start(count: membershipOptions.spareRegions, logger: logger)
                spares.append(node.spares)
                services.append(MembershipService(
                    engine: engine, store: try makeSession(), options: membershipOptions, logger: logger,
                    connect: { member in try node.connect(member) },
                    openRegion: { placement in
                        try node.openRegionWhileServing(placement, size: size, logger: regionLogger)
                    }))
            }
            // The stored configuration's CM starts first, so that it wins the election again: a
            // member elected before it started would take it for a silent CM (its lease counter
            // still) and remove it, a needless reconfiguration at every reopen.
            for service in services.filter({ $0.node == configuration.manager }) + services.filter({ $0.node != configuration.manager }) {
                try await service.start()
            }
            rejoin = Rejoin.embedded(configuration: configuration, options: options, membership: membershipOptions,
                                     logger: logger, makeSession: makeSession)
        }
        var regionAllocation: RegionAllocation?
        if services.isEmpty {
            // A static configuration changes only here: this cluster adds regions on demand.
            let allocation = RegionAllocation(configuration: configuration, storage: storage, engines: engines,
                                              root: root, logger: logger)
            for engine in engines {
                engine.supplyRegions { [weak allocation] primary in
                    guard let allocation else { throw TransactionError.shutDown(primary) }
                    try allocation.addRegion(primary: primary)
                }
            }
            regionAllocation = allocation
        }
        let cluster = Cluster(nodes: engines.map(Node.init), configuration: configuration, directory: root,
                              removeOnShutdown: temporary, coordination: coordination, membership: services,
                              recovery: lastRecovery, regionAllocation: regionAllocation, spares: spares, rejoin: rejoin)
        rejoin?.start(cluster)
        return cluster
    }

    /// Before a reopen with a configuration manager on ZooKeeper changes any file: the store
    /// outlives the process and holds the configurations its manager committed (cluster.json
    /// holds them only on the embedded store), so one newer than cluster.json's means regions may
    /// have moved, and restart recovery over the files as cluster.json places them could roll a
    /// stale replica forward. That is refused, naming both.
    private static func checkStoredConfiguration(of configuration: Configuration, at address: String, manifest: FilePath) async throws {
        #if ZooKeeper
        let session = try ZooKeeperStore(connectString: address, sessionTimeout: .seconds(4))
        let stored: Configuration?
        do {
            stored = try await ConfigurationRecord.read(configuration.cluster, from: session).0
        } catch CoordinationError.noNode(_) {
            stored = nil
        } catch {
            await session.close()
            throw error
        }
        await session.close()
        if let stored, stored.id != configuration.id {
            throw ConfigurationError.invalid("the coordination store at \(address) holds \(stored.id) of \(configuration.cluster), while \(manifest) holds \(configuration.id): its configuration manager moved on (a node removed, regions re-placed), which this directory does not record; nothing was changed. Run the cluster as node processes (`granary cluster up --coordination`, whose restart recovery starts from the store's configuration), or on the embedded store, which writes each configuration to cluster.json")
        }
        #endif
    }

    /// The configuration a cluster reopened without a manager starts in when `configuration` has
    /// new backups whose copy had not completed (restart recovery already ran): without a manager
    /// nothing completes a copy, and a backup missing slabs holds back every record it cannot
    /// apply, so they are dropped and their files set aside (renamed `.removed`); a manager, when
    /// one runs again, gives the regions new backups. A new id, no record of an earlier one
    /// accepted; written to the manifest before anything starts in it.
    private static func droppingCopies(of configuration: Configuration, root: FilePath, manifest: FilePath,
                                       logger: Logger) throws -> Configuration {
        var next = configuration
        var dropped: [String] = []
        for index in next.regions.indices where !next.regions[index].copying.isEmpty {
            let placement = next.regions[index]
            for node in placement.copying {
                if let member = next.members.first(where: { $0.node == node }) {
                    try NodeStorage.directory(of: member).setAside(placement.region)
                }
                dropped.append("\(placement.region) on \(node)")
            }
            next.regions[index].backups.removeAll { placement.copying.contains($0) }
            next.regions[index].copying = []
        }
        next.id = configuration.id.next
        next.routingEpoch = next.id
        try next.validate()
        try writeManifest(next, to: manifest, root: root)
        logger.notice("reopened without a manager in \(next.id): the new backups still copying (\(dropped.joined(separator: ", "))) were dropped; a manager gives the regions new backups")
        return next
    }

    /// The configuration a reopened embedded cluster starts in when its manager had removed
    /// `removed`: `configuration` (restart recovery already ran over its members' logs) with each
    /// of them a member again, its old replica files set aside as superseded, and, with
    /// `replenish` (a manager runs, whose data recovery copies them), new backups of the regions
    /// short of `replicas` on the members holding the fewest; a new id, and no record of an
    /// earlier one accepted. Written to the manifest before anything starts in it. (Without a
    /// manager nothing would copy a new backup, so the regions stay short until one runs.)
    private static func readmitting(_ removed: [NodeID], to configuration: Configuration, root: FilePath, replicas: Int,
                                    replenish: Bool, manifest: FilePath, logger: Logger) throws -> Configuration {
        var next = configuration
        for node in removed {
            let home = try RegionDirectory(root.appending(node.description))
            home.setAsideRegions()
            next.members.append(Member(node: node, endpoint: "shm:" + home.path.string))
        }
        next.members.sort { $0.node < $1.node }
        if replenish {
            next = ConfigurationRecord.replenishing(next, replicas: max(ConfigurationRecord.replication(of: configuration), min(replicas, next.servers.count)))
        }
        next.id = configuration.id.next
        next.routingEpoch = next.id
        try next.validate()
        for made in try NodeStorage.makeUnmadeReplicas(of: next) { logger.notice("\(made)") }
        try writeManifest(next, to: manifest, root: root)
        logger.notice("reopened in \(next.id): \(removed.map(\.description).joined(separator: ", ")) removed before the stop, members again, their old replicas set aside (*.removed)")
        return next
    }

    /// Connects to a cluster of node processes (started by `granary cluster up`) as one of its
    /// clients: a member of the cluster file that holds no region (`granary cluster init
    /// --clients K`). The returned cluster's ``nodes`` hold that one client node; its transactions
    /// read and write every node's regions, and allocate at the regions' primaries.
    /// ``shutdown()`` stops the client, not the cluster.
    ///
    /// With `options.coordination` set to `.zookeeper(address)` (nodes started with `cluster up
    /// --coordination`), the client joins the configuration stored there, follows its changes
    /// and takes part in recovery (`options.membership`, by default 10 ms leases); ``shutdown()``
    /// leaves the configuration. Otherwise the cluster file is the configuration (`--static`).
    /// A cluster file that names its coordination store (`"coordination"`) and lease
    /// (`"leaseMilliseconds"`; see `ClusterFile`) gives them when `options.coordination` is
    /// `.embedded` (the default) and `options.membership` nil.
    ///
    /// - Parameters:
    ///   - file: the cluster file (`cluster.json`); relative endpoints resolve against its directory.
    ///   - client: the client member to be; by default the first one no other process uses.
    ///   - options: the engine's options and the logger (regions, membership and coordination
    ///     are the cluster's, not the client's).
    /// - Throws: `ConfigurationError` when the file names no client member (or `client` is not
    ///   one), or every client is in use; `RegionError` or `TransportError` when a node's mailbox
    ///   is not there (the cluster is not up).
    public static func connect(file: FilePath, client: NodeID? = nil, options: ClusterOptions = ClusterOptions()) async throws -> Cluster {
        let clusterFile = try ClusterFile.load(file.string)
        let root = file.removingLastComponent()
        let configuration = resolvingEndpoints(of: clusterFile.configuration, against: root.isEmpty ? FilePath(".") : root)
        try configuration.validate()
        // What the file says of the coordination store and the lease, unless the options say it.
        var options = options
        if options.coordination == .embedded, let named = clusterFile.coordination {
            options.coordination = .zookeeper(try ClusterFile.zooKeeperAddress(named))
        }
        if options.membership == nil, let lease = clusterFile.leaseMilliseconds {
            var membership = MembershipOptions()
            membership.lease = .milliseconds(lease)
            options.membership = membership
        }
        let clients = configuration.clients
        guard !clients.isEmpty else {
            throw ConfigurationError.invalid("\(file) has no client member (a member that holds no region): write it with `granary cluster init --clients 1`")
        }
        let candidates: [NodeID]
        if let client {
            guard clients.contains(client) else {
                throw ConfigurationError.invalid("\(client) is not a client member of \(file) (its clients: \(clients.map(\.description).joined(separator: ", ")))")
            }
            candidates = [client]
        } else {
            candidates = clients
        }
        // A client's mailbox is used by one process at a time: an exclusive lock on a file in its
        // directory, held until shutdown (or the process ends).
        var claimed: (Member, Int32)?
        for candidate in candidates {
            guard let member = configuration.members.first(where: { $0.node == candidate }) else { continue }
            let home = try NodeStorage.directory(of: member)
            let lock = open(home.path.appending("client.lock").string, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
            guard lock >= 0 else { continue }
            if flock(lock, LOCK_EX | LOCK_NB) == 0 {
                claimed = (member, lock)
                break
            }
            close(lock)
        }
        guard let (member, lock) = claimed else {
            throw ConfigurationError.invalid("every client member of \(file) is in use by another process (\(candidates.map(\.description).joined(separator: ", ")))")
        }
        do {
            var logger = options.logger
            logger[metadataKey: "cluster"] = "\(configuration.cluster)"
            if case .zookeeper(let address) = options.coordination {
                return try await connectCoordinated(configuration: configuration, client: member, lock: lock, root: root,
                                                    address: address, options: options, logger: logger)
            }
            let storage = try NodeStorage(node: member.node, configuration: configuration, ringCapacity: options.ringCapacity)
            // As long as a node waits for its peers (`granary node`): on verbs a node reaches this
            // client's mailbox only once the client's transport listens, so each waits for the other.
            try storage.waitForPeers(timeout: .seconds(60))
            let engine = try storage.makeEngine(options: options.engine, logger: logger)
            do {
                try await storage.waitForAttachments(of: engine, timeout: .seconds(30))
            } catch {
                engine.stop()
                throw error
            }
            return Cluster(nodes: [Node(engine)], configuration: configuration, directory: root, removeOnShutdown: false,
                           coordination: nil, membership: [], recovery: nil, regionAllocation: nil, clientLock: lock)
        } catch {
            close(lock)
            throw error
        }
    }

    /// A client of node processes that run the configuration manager through ZooKeeper
    /// (`granary cluster up --coordination`): the client joins the stored configuration as a
    /// member that holds no region (JOIN, through its registration), follows every configuration
    /// change (NEW-CONFIG: new primaries after a failure, new members), renews its lease, and
    /// takes part in transaction-state recovery as every member does; a client process killed
    /// is removed when its lease runs out, and its transactions in flight are recovered. A
    /// client whose former process still holds its place waits until the CM removes it.
    ///
    /// A client removed while it waits to be admitted (a false suspicion on a loaded host: it
    /// had committed nothing) joins again as a new incarnation, within the same
    /// ``ClusterOptions/admissionTimeout``; one removed
    /// later, while it runs (its lease lapsed), joins again by itself (``Rejoin``).
    private static func connectCoordinated(configuration: Configuration, client me: Member, lock: Int32, root: FilePath,
                                           address: String, options: ClusterOptions, logger: Logger) async throws -> Cluster {
        #if ZooKeeper
        let deadline = ContinuousClock.now + options.admissionTimeout
        var attempt = 1
        while true {
            do {
                return try await joinCoordinated(configuration: configuration, client: me, lock: lock, root: root, address: address,
                                                 options: options, logger: logger, deadline: deadline)
            } catch let removed as RemovedWhileJoining where ContinuousClock.now < deadline {
                logger.notice("\(me.node) was removed while it joined (attempt \(attempt)): \(removed.description); joining again")
                attempt += 1
            } catch let removed as RemovedWhileJoining {
                throw ConfigurationError.invalid(removed.description)
            }
        }
        #else
        throw ConfigurationError.invalid("the coordination store is ZooKeeper at \(address), which this build of Granary leaves out (depend on it with the package trait ZooKeeper)")
        #endif
    }

    #if ZooKeeper
    /// A client's join that ended with its removal before it was admitted.
    private struct RemovedWhileJoining: Error, CustomStringConvertible {
        let description: String
    }

    /// One attempt of ``connectCoordinated(configuration:client:lock:root:address:options:logger:)``.
    private static func joinCoordinated(configuration: Configuration, client me: Member, lock: Int32, root: FilePath, address: String,
                                        options: ClusterOptions, logger: Logger, deadline: ContinuousClock.Instant) async throws -> Cluster {
        let (engine, service, storage) = try await admitClient(configuration: configuration, client: me, root: root, address: address,
                                                               options: options, logger: logger, deadline: deadline)
        let storages = Mutex(storage)
        let rejoin = Rejoin(logger: logger) { node, old, cluster in
            logger.notice("client \(node) was removed from the configuration while it ran (its lease lapsed): it joins again as a new incarnation")
            await old.stop()
            let previous = storages.withLock { $0 }
            _ = try await admitClient(configuration: configuration, client: me, root: root, address: address, options: options, logger: logger,
                                      deadline: .now + options.admissionTimeout, previous: previous) { engine, service, storage in
                storages.withLock { $0 = storage }
                cluster.rejoined(0, engine: engine, service: service, spares: storage.spares)
            }
        }
        let cluster = Cluster(nodes: [Node(engine)], configuration: engine.configuration, directory: root, removeOnShutdown: false,
                              coordination: nil, membership: [service], recovery: nil, regionAllocation: nil, clientLock: lock,
                              rejoin: rejoin)
        rejoin.start(cluster)
        return cluster
    }

    /// One incarnation of a client of a coordinated cluster: its storage (`previous`: its former
    /// incarnation's, see ``NodeStorage``), engine and membership service, joined and admitted (a
    /// configuration lists it and its lease is granted) by `deadline`. `joining` is called with
    /// them just before the join starts (a client that rejoins runs its transactions on the new
    /// engine from then on; they wait for its admission).
    ///
    /// - Throws: `RemovedWhileJoining` when the manager removed it before it was admitted.
    private static func admitClient(configuration: Configuration, client me: Member, root: FilePath, address: String,
                                    options: ClusterOptions, logger: Logger, deadline: ContinuousClock.Instant,
                                    previous: NodeStorage? = nil,
                                    joining: (Engine, MembershipService, NodeStorage) -> Void = { _, _, _ in })
    async throws -> (Engine, MembershipService, NodeStorage) {
        let node = me.node
        let store = try ZooKeeperStore(connectString: address, sessionTimeout: .seconds(4))
        do {
            var stored: Configuration
            do {
                stored = try await ConfigurationRecord.read(configuration.cluster, from: store).0
            } catch CoordinationError.noNode(_) {
                throw ConfigurationError.invalid("the coordination store at \(address) holds no configuration of \(configuration.cluster): start its nodes first (granary cluster up --coordination zookeeper://\(address))")
            }
            stored = Cluster.resolvingEndpoints(of: stored, against: root.isEmpty ? FilePath(".") : root)
            if stored.contains(node) {
                stored = try await ConfigurationRecord.waitForRemoval(of: node, from: stored, in: store, timeout: .seconds(30))
            }
            stored.members.append(me)
            let storage = try NodeStorage(node: node, configuration: stored, transport: NodeStorage.transportKind(of: node, in: stored),
                                          ringCapacity: options.ringCapacity, previous: previous)
            try storage.waitForPeers(timeout: .seconds(10))
            let engine = try storage.makeEngine(options: options.engine, logger: logger)
            // Fenced before `joining` hands it out: its configuration is the stored one with itself
            // added, its own guess until the CM admits it, so it commits nothing before its first
            // grant (`start(joining:)` fences it too, but only later).
            engine.setFenced(true)
            let service = MembershipService(
                engine: engine, store: store, options: options.membership ?? MembershipOptions(), logger: logger,
                connect: { member in try storage.connect(member) },
                openRegion: { placement in
                    throw ConfigurationError.invalid("\(node) is a client: it holds no replica, and \(placement.region) was placed on it")
                })
            joining(engine, service, storage)
            try await service.start(joining: true)
            // Ready once a configuration lists the client and its lease is granted.
            while !engine.configuration.contains(node) || engine.commitsBlocked {
                let removed = service.mustRejoin
                guard ContinuousClock.now < deadline, !removed else {
                    let seen = engine.configuration
                    let now = (try? await ConfigurationRecord.read(configuration.cluster, from: store).0).map(\.description) ?? "unreadable"
                    await service.stop()
                    engine.stop()
                    let description = "\(node) asked to join \(configuration.cluster) through \(address), but was not admitted within \(options.admissionTimeout) (is a configuration manager running?): it is in \(seen.id) (\(seen.contains(node) ? "listed" : "not listed"), commits \(engine.commitsBlocked ? "blocked: no lease granted yet, or a recovery under way" : "open")\(removed ? ", removed" : "")); the store holds \(now)"
                    if removed { throw RemovedWhileJoining(description: description) }
                    throw ConfigurationError.invalid(description)
                }
                try await Task.sleep(for: .milliseconds(2))
            }
            do {
                try await storage.waitForAttachments(of: engine, timeout: .seconds(30))
            } catch {
                await service.stop()
                engine.stop()
                throw error
            }
            return (engine, service, storage)
        } catch {
            await store.close()
            throw error
        }
    }
    #endif

    /// A cluster dropped without ``shutdown()`` still stops its nodes' threads (pollers), so
    /// nothing of it keeps running or holds its memory; its files are left as they are (a later
    /// reopen recovers from them).
    deinit {
        for node in nodes { node.engine.stop() }
        if removeOnShutdown { try? FileManager.default.removeItem(atPath: directory.string) }
        if clientLock >= 0 { close(clientLock) }
    }

    /// Waits until every committed transaction is applied on every replica: sends the pending
    /// TRUNCATE records and waits until no node has a record to process.
    /// - Throws: ``ClusterError/notQuiescent(timeout:nodes:report:)`` naming the nodes that still
    ///   had records to process (or replies to send) after `timeout`.
    public func quiesce(timeout: Duration = .seconds(30)) async throws {
        // Crashed or removed nodes serve nothing: only the running ones are waited for.
        let serving = servingNodes
        for node in serving { try node.engine.flushTruncations() }
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while !serving.allSatisfy({ $0.engine.isQuiescent }) {
            guard clock.now < deadline else {
                let busy = serving.filter { !$0.engine.isQuiescent }
                throw ClusterError.notQuiescent(timeout: timeout, nodes: busy.map(\.id),
                                                report: busy.map(\.engine.channelReport).joined(separator: "\n"))
            }
            try await Task.sleep(for: .microseconds(200))
        }
    }

    /// Node `index`'s new incarnation (``Rejoin``): its engine, membership service and
    /// spare regions replace the old ones.
    func rejoined(_ index: Int, engine: Engine, service: MembershipService, spares pool: SpareRegions) {
        for other in nodes where other.id != nodes[index].id { other.engine.helpNeighbours([engine]) }
        engine.helpNeighbours(nodes.filter { $0.id != nodes[index].id }.map(\.engine))
        nodes[index].replaceEngine(with: engine)
        services.withLock { services in
            if let slot = services.firstIndex(where: { $0.node == service.node }) { services[slot] = service }
        }
        spares.withLock { $0.append(pool) }
    }

    /// The nodes still serving: not crashed, stopped or removed from the configuration.
    public var servingNodes: [Node] { nodes.filter(\.isServing) }

    /// Stops node `id` as SIGKILL would, for tests and benchmarks of recovery: its threads stop at
    /// once (its poller after the record at hand; a commit of it in progress at its next send),
    /// nothing is flushed, its mailbox is no longer served, its lease is no longer renewed (its
    /// coordination session is left to expire), and its region files stay. With a configuration
    /// manager the others detect the failure through the lease and recover without it.
    public func crash(_ id: NodeID) {
        guard let node = nodes.first(where: { $0.id == id }) else { return }
        rejoin?.crashed(id)
        membership.first { $0.node == id }?.crash()
        node.engine.crash()
    }

    /// Stops every node at once, without quiescing or persisting (as the end of the process
    /// would), and removes the directory if it is a temporary one: for a program that gives up on
    /// the cluster after an error. A temporary cluster's region files are memory when they are in
    /// `/dev/shm`; a run that failed must not leave them behind. Harmless after ``shutdown()``.
    package func abandon() {
        for service in membership { service.crash() }
        for pool in spares.withLock({ $0 }) { pool.stop() }
        for node in nodes { node.engine.stop() }
        if removeOnShutdown { try? FileManager.default.removeItem(atPath: directory.string) }
    }

    /// Quiesces, persists every region, stops every node, and removes the directory if it was a
    /// temporary one (also when quiescing fails: the error is thrown after).
    public func shutdown() async throws {
        if clientLock >= 0 {
            // A client of a coordinated cluster leaves (the CM removes it at once) before it stops.
            for service in membership where !service.mustRejoin { _ = try? await service.leave() }
        }
        await rejoin?.stop()
        for service in membership { await service.stop() }
        for pool in spares.withLock({ $0 }) { pool.stop() }
        do {
            try await quiesce()
        } catch {
            if removeOnShutdown { abandon() }
            throw error
        }
        // Persisting is for a cluster that outlives this process; a temporary one is removed next.
        if !removeOnShutdown {
            var regions: [Region] = []
            for node in nodes {
                let placed = Set((configuration.regions + node.engine.configuration.regions).map(\.region))
                regions += placed.sorted().compactMap { node.engine.replica(of: $0) }
            }
            // msync of whole regions blocks for as long as the disk takes: on a thread of its own,
            // never one of the cooperative pool's (seen: clusters shutting down at once in the
            // unit tests held both pool threads of this 2-core machine for minutes).
            try await onThreadOfItsOwn { [regions] in
                for region in regions { try region.persist(offset: 0, length: region.size) }
            }
        }
        for node in nodes { node.engine.stop() }
        if removeOnShutdown { try? FileManager.default.removeItem(atPath: directory.string) }
    }

    /// `configuration` with every member's endpoint resolved against `root` (``resolve(_:against:)``):
    /// how a cluster file's relative region directories are read, wherever the reader runs.
    package static func resolvingEndpoints(of configuration: Configuration, against root: FilePath) -> Configuration {
        var resolved = configuration
        resolved.members = configuration.members.map { Member(node: $0.node, endpoint: resolve($0.endpoint, against: root), client: $0.client) }
        return resolved
    }

    /// `endpoint` (`shm:<directory>` or `verbs:<directory>`) with a relative directory resolved
    /// against `root` (a `verbs://` endpoint's directory is absolute).
    package static func resolve(_ endpoint: String, against root: FilePath) -> String {
        guard let parsed = MemberEndpoint(endpoint) else { return endpoint }
        let path = FilePath(parsed.directory)
        return path.isAbsolute ? endpoint : parsed.with(directory: root.pushing(path).string)
    }

    private static func makeTemporaryDirectory() throws -> String {
        let shm = try RegionDirectory(FilePath("/dev/shm"), create: false)
        let base = ProcessInfo.processInfo.environment["TMPDIR"]
            ?? (SpareRegion.isMemoryFileSystem(shm) && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp")
        var template = Array("\(base)/granary-cluster-XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw RegionError.systemCall(call: "mkdtemp", path: FilePath(base), message: String(cString: strerror(errno)))
        }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// One node of a cluster: where transactions are started.
public final class Node: Sendable {
    /// The engine this node runs now: a node of an embedded cluster that the configuration
    /// manager removed (a false suspicion) rejoins with a new one (``Cluster`` replaces it).
    /// One acquiring load, no lock and no reference count: every engine this node ever had stays
    /// alive in `engines` for as long as the node, so the pointer loaded is always to a live one.
    package var engine: Engine {
        Unmanaged<Engine>.fromOpaque(UnsafeRawPointer(bitPattern: current.load(ordering: .acquiring))!).takeUnretainedValue()
    }
    private let current: Atomic<UInt>
    private let engines: Mutex<[Engine]>
    /// This node's id in the cluster (its index in ``Cluster/nodes``).
    public let id: NodeID

    init(_ engine: Engine) {
        id = engine.node
        engines = Mutex([engine])
        current = Atomic(UInt(bitPattern: Unmanaged.passUnretained(engine).toOpaque()))
    }

    /// Makes `engine` (of the same node) the one transactions run on from now on; the one before
    /// is kept (transactions that started on it end on it).
    func replaceEngine(with engine: Engine) {
        precondition(engine.node == id, "the engine of \(engine.node) given to node \(id)")
        engines.withLock { $0.append(engine) }
        current.store(UInt(bitPattern: Unmanaged.passUnretained(engine).toOpaque()), ordering: .releasing)
    }

    /// Whether this node still serves: not crashed, stopped or removed from the configuration.
    public var isServing: Bool { engine.isRunning && engine.configuration.contains(id) }

    /// Runs `body` as a strictly serializable transaction coordinated by this node, and commits it.
    ///
    /// `body` executes the transaction: `Transaction.read(_:as:)` costs one one-sided read of the
    /// object's primary; writes, allocations and frees are buffered. At commit, a read-only
    /// transaction costs nothing more (one read) or one batch of one-sided header reads (several);
    /// a read-write one costs one LOCK round trip to the written objects' primaries, one batch of
    /// header reads for VALIDATE, and one-way COMMIT-BACKUP and COMMIT-PRIMARY records.
    ///
    /// On a conflict the attempt aborts and `body` runs again, after a randomised back-off, up to
    /// `EngineOptions.maximumAttempts` times. `body` may therefore run more than once; only the
    /// committed run's effects exist.
    ///
    /// **Nothing reaches the caller unvalidated.** An error that `body` throws (its own, after a
    /// business check, or one of the engine's that it lets through, such as
    /// `TransactionError.notAllocated(_:)`) is returned only after everything the attempt read
    /// still holds, checked as at commit; if it does not, the attempt saw a state no serial order
    /// gives, and it runs again as after a conflict. An absence is a read: reading a freed or never
    /// allocated object puts it in the read set at the header seen, so a body that catches
    /// `notAllocated` and goes on commits only if the object is still absent.
    ///
    /// **Every outcome is exact.** Returning means committed: every backup holds the transaction's
    /// records, and it survives the loss of every process (see README, "Durability and failures").
    /// `TransactionError.outcomeUnknown(reason:)` means the coordinator could not learn whether it
    /// committed (a send failed after COMMIT-BACKUP began): recovery from the logs decides, for
    /// every replica alike. Any other error means it did not commit, and left no lock behind that
    /// the engine cannot release.
    ///
    /// - Throws: `TransactionError` (`.conflict` when every attempt aborted, `.tooLarge` for a
    ///   transaction whose records would not fit a channel, refused before anything is locked),
    ///   what `body` throws (validated as above; the attempt is abandoned and nothing is written),
    ///   or `CancellationError` when the task is cancelled before an attempt or while one waits
    ///   for its LOCK replies (that attempt aborts: ABORT goes to its primaries, nothing is
    ///   written); an attempt past LOCK runs to its outcome, so a cancelled task never leaves one
    ///   half done.
    ///
    /// **Waiting without a thread.** LOCK replies usually come within microseconds; an attempt
    /// whose replies are not in after `EngineOptions.lockWaitSpin` suspends and checks again
    /// after growing pauses (up to 1 ms) until they are, or `EngineOptions.replyTimeout` runs
    /// out: transactions waiting on a slow, paused or dead peer leave the cooperative pool's
    /// threads to the other tasks.
    ///
    /// **A failed peer.** With a configuration manager, an attempt that fails on a dead, silent
    /// or paused peer (it aborted: nothing written, nothing left locked) is tried again once the
    /// manager has removed that peer and the survivors have recovered without it, waiting up to
    /// `EngineOptions.replyTimeout` for that; without a manager nothing removes a peer, and the
    /// error (`TransactionError.peerUnresponsive`, `.transport`) is thrown at once.
    ///
    /// **This node removed.** A node of an embedded cluster, or the client of a connection, that
    /// the manager removed while it ran (its lease lapsed) rejoins as a new incarnation; a
    /// transaction whose engine stopped under it before it could commit (`.shutDown`) runs again
    /// on the new one, and waits for its admission.
    ///
    /// The body runs on the caller's isolation (`#isolation`): called from the main actor it runs
    /// there; from a task, on that task's executor.
    public func transaction<R: Sendable>(isolation: isolated (any Actor)? = #isolation,
                                         _ body: (Transaction) throws -> R) async throws -> R {
        // The engine once, for the whole transaction: each read of `engine` is an atomic load
        // and a retain, on a line every thread of the node touches. (A node that rejoins gets a
        // new engine; a transaction that started on the old one ends on it.)
        let engine = self.engine
        let transaction = engine.makeTransaction()
        var attempt = 0
        var lastCause = AbortCause.lockConflict
        let spin = engine.options.lockWaitSpin.map(\.wholeNanoseconds)
        while attempt < engine.options.maximumAttempts {
            // A cancelled task starts no attempt (one that ran aborted, and nothing was written).
            try Task.checkCancellation()
            attempt += 1
            var outcome: Engine.AttemptOutcome<R>
            do {
                outcome = try engine.attempt(transaction, body, spinNanoseconds: spin)
                // LOCK replies are late (a peer is slow, paused or dead): wait for them without
                // holding a thread of the cooperative pool. Cancelled meanwhile, the attempt stops
                // waiting and aborts (ABORT to its primaries); the loop then throws.
                var pause: UInt64 = 20_000
                while case .waitingForLockReplies(let result) = outcome {
                    if Task.isCancelled {
                        engine.abandonLockWait(transaction)
                    } else {
                        try? await Task.sleep(nanoseconds: pause)
                        pause = min(2 * pause, 1_000_000)
                    }
                    outcome = try engine.resumeAttempt(transaction, result: result, spinNanoseconds: spin)
                }
            } catch {
                // A dead or paused peer: with a configuration manager, tried again once the peer
                // has been removed and recovered from.
                if !Task.isCancelled, try await engine.retriesAfterRemoval(after: error) { continue }
                // This node was removed and has rejoined as a new incarnation (``Rejoin``): its
                // former engine stopped under the attempt, which did not commit (`shutDown` is
                // never thrown past the point where it might have). It runs on the new engine.
                if case .shutDown? = error as? TransactionError, self.engine !== engine, !Task.isCancelled {
                    return try await self.transaction(isolation: isolation, body)
                }
                throw error
            }
            switch outcome {
            case .waitingForLockReplies:
                continue
            case .committed(let result):
                return result
            case .aborted(let cause):
                lastCause = cause
                if engine.mustWaitForRecovery(after: cause) {
                    // Recovery runs (or the lease lapsed): wait for it without holding a thread of
                    // the cooperative pool (recovery's own tasks may need it); the attempt does
                    // not count.
                    if try await engine.waitForUnblockedCommits() { attempt -= 1 }
                    continue
                }
                // Wait without holding a thread of the cooperative pool.
                let wait = engine.retryDelay(afterAttempt: attempt)
                if wait >= 1_000 { try await Task.sleep(nanoseconds: wait) } else { await Task.yield() }
            }
        }
        throw TransactionError.conflict(lastCause, attempts: attempt)
    }

    /// The synchronous form of ``transaction(isolation:_:)`` for hot loops on dedicated threads: the same
    /// engine, without a suspension point.
    public func transactionSync<R>(_ body: (Transaction) throws -> R) throws -> R {
        let engine = self.engine
        do {
            return try engine.run(body)
        } catch TransactionError.shutDown where self.engine !== engine {
            // Rejoined as a new incarnation under it (see ``transaction(isolation:_:)``).
            return try transactionSync(body)
        }
    }

    /// This node's counters.
    public var statistics: EngineStatistics.Snapshot { engine.statistics.snapshot }
}

/// A cluster-wide wait that did not complete.
public enum ClusterError: Error, Sendable, Equatable, CustomStringConvertible {
    /// ``Cluster/quiesce(timeout:)`` gave up: `nodes` still had records to process or replies to
    /// send after `timeout`; `report` is their channels' state.
    case notQuiescent(timeout: Duration, nodes: [NodeID], report: String)

    /// The error in words: the timeout, the busy nodes and their channels' state.
    public var description: String {
        switch self {
        case .notQuiescent(let timeout, let nodes, let report):
            "the cluster did not quiesce within \(timeout): \(nodes.map(\.description).joined(separator: ", ")) still busy\n\(report)"
        }
    }
}
