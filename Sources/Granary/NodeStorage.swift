import Foundation
import GranaryConfiguration
import GranaryEngine
import GranaryMemory
import GranaryTransport
#if RDMA
import GranaryVerbs
#endif
import Logging
import SystemPackage

/// Which transport a node process uses.
package enum NodeTransportKind: Sendable, Equatable {
    case sharedMemory
    /// RDMA verbs on `device` (nil: GRANARY_RDMA_DEVICE, else the first device).
    case verbs(device: String?)
}

/// A node's memory for any transport: its replicas and mailbox in its region directory, and a
/// transport (shared memory or verbs) that reaches every member through its directory.
package struct NodeStorage: Sendable {
    package let node: NodeID
    package let configuration: Configuration
    package let transport: any Transport
    package let mailbox: Mailbox
    /// The node's lease page (``RegionID/leasePage(of:)``): volatile memory, never a file page,
    /// so that renewing a lease never waits on a file system.
    package let leasePage: Region
    package let replicas: [Region]
    package let home: RegionDirectory
    /// Spare region files for replicas placed on this node while it serves (kept once started).
    package let spares: SpareRegions
    /// The transport when it is the shared-memory one (an embedded cluster shares mappings).
    package let sharedMemory: SharedMemoryTransport?
    private let connectPeer: @Sendable (Member) throws -> Void

    /// The region directory a member's endpoint names (see `MemberEndpoint`): `shm:<directory>`,
    /// `verbs:<directory>` or `verbs://ip:port/<directory>` (the directory on the member's own host).
    package static func directory(of member: Member) throws -> RegionDirectory {
        guard let endpoint = MemberEndpoint(member.endpoint) else {
            throw ConfigurationError.invalid("member \(member.node) has endpoint '\(member.endpoint)'; endpoints are \(MemberEndpoint.forms)")
        }
        return try RegionDirectory(FilePath(endpoint.directory))
    }

    /// - Parameter node: the node whose storage this is (a member of `configuration`).
    /// - Parameter configuration: the configuration it starts in: its regions are opened or created.
    /// - Parameter kind: the transport, shared memory or RDMA verbs.
    /// - Parameter ringCapacity: the capacity of each ring of the node's mailbox, in bytes.
    /// - Parameter preservingLog: open an existing mailbox without clearing its rings (the node's
    ///   log), for `RestartRecovery` to read before the engine starts.
    /// - Parameter reopening: the node's files must all exist (a cluster reopened from its
    ///   directory): a missing region file is `RegionError.missing(path:)`, never a new empty
    ///   region; and the mailbox keeps its rings, the node's log, for `RestartRecovery`.
    /// - Parameter previous: the storage of this node's former incarnation in this process (a
    ///   client that rejoins). Over verbs its transport is kept (it holds the directory's endpoint
    ///   and the registrations the former engine may still reach): the mailbox file is mapped
    ///   again and cleared in place, so the registration of its former mapping (the same file
    ///   pages) stays valid; the lease page is new and registered in place of the former one. Over shared
    ///   memory everything is made anew, as for a node of an embedded cluster that rejoins.
    package init(node: NodeID, configuration: Configuration, transport kind: NodeTransportKind, ringCapacity: Int,
                preservingLog: Bool = false, reopening: Bool = false, previous: NodeStorage? = nil) throws {
        guard let member = configuration.members.first(where: { $0.node == node }) else {
            throw ConfigurationError.invalid("\(node) is not a member of \(configuration.id)")
        }
        self.node = node
        self.configuration = configuration
        home = try Self.directory(of: member)
        spares = SpareRegions(home: home, size: configuration.regionSize)
        let kept = previous.flatMap { $0.sharedMemory == nil ? $0 : nil }
        if let kept {
            transport = kept.transport
            sharedMemory = nil
            connectPeer = kept.connectPeer
        } else {
        switch kind {
        case .sharedMemory:
            let shm = SharedMemoryTransport(localNode: node, cluster: configuration.cluster, directory: home)
            transport = shm
            sharedMemory = shm
            connectPeer = { member in shm.addPeer(member.node, endpoint: try Self.directory(of: member)) }
        case .verbs(let device):
            #if RDMA
            var options = VerbsTransport.Options()
            options.device = device
            // A member reached by address listens there; one reached through its directory
            // listens where its device's address and the RDMA CM put it.
            if case .verbsAddress(let address, _)? = MemberEndpoint(member.endpoint) { options.listenAddress = address }
            let verbs = try VerbsTransport(localNode: node, cluster: configuration.cluster, directory: home, options: options)
            transport = verbs
            sharedMemory = nil
            connectPeer = { member in
                switch MemberEndpoint(member.endpoint) {
                case .verbsAddress(let address, _)?: verbs.addPeer(member.node, address: address)
                default: verbs.addPeer(member.node, endpoint: try Self.directory(of: member))
                }
            }
            #else
            _ = device
            throw ConfigurationError.invalid("node \(node) is to use the RDMA verbs transport, which this build of Granary leaves out (depend on it with the package trait RDMA)")
            #endif
        }
        }
        var replicas: [Region] = []
        for placement in configuration.regions where placement.replicas.contains(node) {
            let region = reopening
                ? try home.open(placement.region, cluster: configuration.cluster)
                : try home.openOrCreate(placement.region, size: configuration.regionSize, cluster: configuration.cluster)
            guard region.kind == .data, region.size == configuration.regionSize else {
                throw RegionError.corrupt(path: region.path, reason: "a \(region.kind) region of \(region.size) bytes where the configuration places a data region of \(configuration.regionSize) bytes")
            }
            try transport.register(region)
            replicas.append(region)
        }
        self.replicas = replicas
        mailbox = try Mailbox(node: node, directory: home, cluster: configuration.cluster, ringCapacity: ringCapacity,
                              preservingLog: preservingLog)
        try transport.register(mailbox.region)
        leasePage = try home.createLeasePage(of: node, cluster: configuration.cluster)
        if kept != nil {
            // Published in place of the former incarnation's page: a CM that has not yet applied
            // this node's removal keeps reading the former page (renewed no more) and grants
            // nothing to this incarnation, which it has not admitted.
            #if RDMA
            guard let verbs = transport as? VerbsTransport else { throw ConfigurationError.invalid("\(node)'s former transport is not verbs") }
            try verbs.register(replacing: leasePage)
            #endif
        } else {
            try transport.register(leasePage)
        }
        for other in configuration.members where other.node != node {
            try connectPeer(other)
        }
    }

    /// Opens this node's replica of `placement`'s region while the node serves (a new backup
    /// after a failure, a region on demand). A missing file is made from a spare (``spares``,
    /// once started), whose space is reserved and whose pages are mapped in already; without
    /// one, it is created without reserving its space
    /// first: on tmpfs that reservation zeroes every page (about 15 ms for 64 MiB), and a new
    /// backup is made while commits wait for recovery. The space is reserved afterwards on a
    /// thread of its own, 256 KiB at a time with a 4 ms pause after each (at once, the zeroing took
    /// the CPU from the foreground for about 50 ms after recovery on this 2-core machine); a
    /// failure, such as a full file system, is logged naming the file. The region is registered
    /// with the transport.
    package func openRegionWhileServing(_ placement: RegionPlacement, size: Int, logger: Logger) throws -> Region {
        let region: Region
        var created = false
        do {
            region = try home.open(placement.region, cluster: configuration.cluster)
        } catch .missing {
            if let spare = spares.take() {
                region = try home.create(placement.region, size: size, cluster: configuration.cluster, from: spare)
            } else {
                region = try home.create(placement.region, size: size, cluster: configuration.cluster, sparse: true)
                created = true
            }
        }
        try transport.register(region)
        if created {
            let node = self.node
            Thread.detachNewThread {
                do throws(RegionError) {
                    try region.reserveSpace(chunk: 256 << 10, pausing: .milliseconds(4))
                } catch {
                    logger.error("\(node) could not reserve the space of its new replica of \(placement.region): \(error); a store into it fails once its file system is full")
                }
            }
        }
        return region
    }

    /// Makes `member`, a node that joined, reachable. A node that comes back after it left is a
    /// new process with new region files (and, on verbs, new memory keys): what this node learnt
    /// of its former self's regions is dropped first.
    package func connect(_ member: Member) throws {
        if let sharedMemory {
            sharedMemory.forgetRegions(of: member.node)
        } else {
            #if RDMA
            if let verbs = transport as? VerbsTransport { verbs.disconnect(from: member.node) }
            #endif
        }
        try connectPeer(member)
    }

    /// A node on the transport its endpoint names: RDMA verbs for `verbs:` and `verbs://` (on
    /// `GRANARY_RDMA_DEVICE`, else the first device), shared memory otherwise.
    package init(node: NodeID, configuration: Configuration, ringCapacity: Int, preservingLog: Bool = false,
                reopening: Bool = false) throws {
        try self.init(node: node, configuration: configuration, transport: Self.transportKind(of: node, in: configuration),
                      ringCapacity: ringCapacity, preservingLog: preservingLog, reopening: reopening)
    }

    /// The transport `node`'s endpoint in `configuration` names.
    package static func transportKind(of node: NodeID, in configuration: Configuration) -> NodeTransportKind {
        let endpoint = configuration.members.first(where: { $0.node == node }).flatMap { MemberEndpoint($0.endpoint) }
        return endpoint?.isVerbs == true ? .verbs(device: nil) : .sharedMemory
    }

    /// Waits until every other member's mailbox is reachable through the transport: the file
    /// is complete and the peer has registered it (a peer in another process may be starting).
    /// A member on another host (`verbs://`) is waited for through the transport alone. A client
    /// member reached over verbs is not waited for: its transport answers only while its program
    /// runs, which may start long after the nodes or not at all (channels to it attach when it
    /// first sends); over shared memory its mailbox file is there all along.
    package func waitForPeers(timeout: Duration) throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        for member in configuration.members where member.node != node {
            if member.client, sharedMemory == nil { continue }
            let path = try Self.directory(of: member).path(for: RegionID.mailbox(of: member.node))
            let remote = MemberEndpoint(member.endpoint)?.isRemote ?? false
            while true {
                do {
                    if !remote { _ = try Region.open(at: path, expecting: RegionID.mailbox(of: member.node), cluster: configuration.cluster) }
                    var word: UInt64 = 0
                    try withUnsafeMutableBytes(of: &word) { (bytes) throws(TransportError) in
                        try transport.read(from: member.node, GlobalAddress(region: .mailbox(of: member.node), offset: 16), into: bytes)
                    }
                    break
                } catch {
                    guard clock.now < deadline else {
                        throw TransportError.peerUnreachable(node: member.node, detail: "its mailbox \(path) is not ready after \(timeout): \(error)")
                    }
                    usleep(10_000)
                }
            }
        }
    }

    /// Waits until every other member of `engine`'s configuration (read again at each look: a
    /// node removed meanwhile is not waited for) that is not a client has attached its channels
    /// (the log and the message queue) to this node's mailbox, which was cleared when it was
    /// opened. A client calls it before its first transaction: a node that reached a former
    /// process of this client and has not yet noticed the restart (its check runs every 10 ms)
    /// would write replies at the former stream's positions, where this process never reads them.
    ///
    /// - Throws: `TransportError.peerUnreachable(node:detail:)` naming a node that did not attach
    ///   within `timeout`.
    package func waitForAttachments(of engine: Engine, timeout: Duration) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            let waiting = engine.configuration.members.first { member in
                member.node != node && !member.client
                    && !(mailbox.hasAttachedSender(member.node) && mailbox.hasAttachedSender(member.node, kind: .messages))
            }
            guard let waiting else { return }
            guard clock.now < deadline else {
                throw TransportError.peerUnreachable(node: waiting.node, detail: "it did not attach its channels to the mailbox of \(node) within \(timeout) (a running node attaches within about 10 ms)")
            }
            try await Task.sleep(for: .microseconds(500))
        }
    }

    /// Starts the node's transaction engine over this storage.
    package func makeEngine(options: EngineOptions, logger: Logger) throws -> Engine {
        try Engine(node: node, configuration: configuration, transport: transport, mailbox: mailbox,
                   leasePage: leasePage, replicas: replicas, options: options, logger: logger)
    }
}

extension NodeStorage {
    /// Restart recovery for a cluster of node processes stopped as a whole (every process killed,
    /// or stopped by `granary cluster down`): opens every member's files in this process (they
    /// must all be on this host, as `granary cluster up` keeps them), recovers the transactions in
    /// their logs as `Cluster.local` does when it reopens a directory, and leaves the logs empty,
    /// so that the nodes start afresh. Run it while no node of the cluster runs.
    ///
    /// - Throws: `RegionError` for a node's file that is missing or not what the configuration
    ///   says (nothing is recovered then: no file was changed).
    package static func recoverStoppedCluster(_ configuration: Configuration, ringCapacity: Int,
                                              logger: Logger? = nil) throws -> RestartRecovery.Report {
        let storage = try configuration.members.map {
            try NodeStorage(node: $0.node, configuration: configuration, transport: .sharedMemory, ringCapacity: ringCapacity,
                            preservingLog: true, reopening: true)
        }
        return RestartRecovery.recover(
            configuration: configuration,
            nodes: storage.map { RestartRecovery.NodeFiles(node: $0.node, mailbox: $0.mailbox, replicas: $0.replicas) },
            logger: logger)
    }

    /// Makes the replica files that `configuration` (the last one a coordination store holds)
    /// places but that were never made, because their nodes were killed before they applied it,
    /// and says which (the files are the only thing changed). With a configuration manager a
    /// configuration is committed first and each member makes the replicas it places on that node
    /// when it applies it, so a cluster stopped as a whole in between has:
    /// - a **new backup** (marked copying) with no file: it is made empty; the node copies the
    ///   region from its primary again when it starts, as it does for one whose copy was cut short;
    /// - a **region added on demand** missing on some replicas: no commit can have touched it (every
    ///   member makes its replica before any commit resumes), so it is made empty when every
    ///   replica that exists is still unused (no slab carved).
    /// A missing replica otherwise (a file removed by hand from a region that holds data) is a
    /// `ConfigurationError` naming the file and the replicas that hold data, and nothing is made.
    package static func makeUnmadeReplicas(of configuration: Configuration) throws -> [String] {
        var plan: [(RegionDirectory, RegionPlacement, NodeID, String)] = []
        for placement in configuration.regions {
            var missing: [(NodeID, RegionDirectory)] = []
            var used: [FilePath] = []
            for node in placement.replicas {
                guard let member = configuration.members.first(where: { $0.node == node }) else { continue }
                let home = try directory(of: member)
                if let region = try openIfPresent(placement.region, in: home, cluster: configuration.cluster) {
                    if !isUnused(region) { used.append(region.path) }
                } else {
                    missing.append((node, home))
                }
            }
            for (node, home) in missing {
                if placement.copying.contains(node) {
                    plan.append((home, placement, node, "a new backup that had not begun its copy"))
                } else if used.isEmpty {
                    plan.append((home, placement, node, "a region no commit has used yet"))
                } else {
                    throw ConfigurationError.invalid(
                        "\(configuration.id) places a replica of \(placement.region) on \(node), whose file \(home.path(for: placement.region)) does not exist, while \(used.map(\.string).joined(separator: ", ")) hold\(used.count == 1 ? "s" : "") data of it: the file was removed: restore it (nothing was made or changed)")
                }
            }
        }
        var made: [String] = []
        for (home, placement, node, why) in plan {
            let region = try home.create(placement.region, size: configuration.regionSize, cluster: configuration.cluster)
            made.append("made \(node)'s replica of \(placement.region) (\(region.path)), never made before the stop: \(why)")
        }
        return made
    }

    private static func openIfPresent(_ id: RegionID, in home: RegionDirectory, cluster: ClusterID) throws -> Region? {
        do {
            return try home.open(id, cluster: cluster)
        } catch RegionError.missing {
            return nil
        }
    }

    /// Whether no slab of `region` has been carved (its slab table is all zero): nothing was ever
    /// allocated in it.
    private static func isUnused(_ region: Region) -> Bool {
        let layout = SlabLayout(regionSize: region.size, slabShift: region.slabShift)
        let table = UnsafeRawBufferPointer(start: region.base + SlabLayout.tableOffset, count: layout.slabCount * 2)
        return table.allSatisfy { $0 == 0 }
    }

    /// How many records this node's log (its mailbox, opened with `preservingLog`) kept from
    /// before the node stopped: records that restart recovery must decide before anything serves.
    package var keptRecords: Int {
        var count = 0
        for member in configuration.members {
            Mailbox.keptMessages(in: mailbox.region, ringCapacity: mailbox.ringCapacity, from: member.node) { _, _ in count += 1 }
        }
        return count
    }
}
