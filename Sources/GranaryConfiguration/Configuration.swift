import GranaryMemory

/// The number of a configuration. Every configuration change increases it by one; every message and
/// log record carries the id of the configuration it was sent in.
public struct ConfigurationID: RawRepresentable, Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    /// The number (a new cluster's first configuration is 1).
    public var rawValue: UInt64
    /// The configuration numbered `rawValue`.
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// The configuration after this one.
    @inlinable public var next: ConfigurationID { ConfigurationID(rawValue: rawValue + 1) }
    /// Whether `a` is an earlier configuration than `b`.
    ///
    /// - Parameters:
    ///   - a: the configuration id compared.
    ///   - b: the id it is compared with.
    @inlinable public static func < (a: ConfigurationID, b: ConfigurationID) -> Bool { a.rawValue < b.rawValue }
    /// `config#` and the number, as logs and errors show it.
    public var description: String { "config#\(rawValue)" }
}

/// A member of a configuration: a node and how peers reach it.
public struct Member: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The member's node id.
    public var node: NodeID
    /// Transport endpoint (see ``MemberEndpoint``): `shm:<region directory>` for the
    /// shared-memory transport, `verbs:<region directory>` for RDMA verbs between nodes of one
    /// host, `verbs://ip:port/<region directory>` for RDMA verbs between hosts.
    public var endpoint: String
    /// Whether the member is a client: it coordinates transactions and allocates at other nodes'
    /// primaries, but holds no replica, is never placed one, and never becomes the configuration
    /// manager (`granary cluster init --clients K`, `Cluster.connect`). In JSON, `"client": true`
    /// (absent for other members).
    public var client: Bool

    /// Member `node`, reached at `endpoint`.
    ///
    /// - Parameters:
    ///   - node: the member's node id.
    ///   - endpoint: how peers reach it (``endpoint``).
    ///   - client: whether it is a client (``client``).
    public init(node: NodeID, endpoint: String, client: Bool = false) {
        self.node = node
        self.endpoint = endpoint
        self.client = client
    }

    private enum CodingKeys: String, CodingKey { case node, endpoint, client }

    /// Decodes a member; `client` is false when absent.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        node = try container.decode(NodeID.self, forKey: .node)
        endpoint = try container.decode(String.self, forKey: .endpoint)
        client = try container.decodeIfPresent(Bool.self, forKey: .client) ?? false
    }

    /// Encodes a member; `client` only when true.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(node, forKey: .node)
        try container.encode(endpoint, forKey: .endpoint)
        if client { try container.encode(true, forKey: .client) }
    }

    /// The node and its endpoint, `node@endpoint` (and `(client)` for a client).
    public var description: String { "\(node)@\(endpoint)" + (client ? " (client)" : "") }
}

/// A member's endpoint, read: which transport reaches it and where.
public enum MemberEndpoint: Sendable, Equatable {
    /// `shm:<directory>`: the shared-memory transport; the node's region directory on this host.
    case sharedMemory(directory: String)
    /// `verbs:<directory>`: RDMA verbs between nodes of one host; the node's transport writes the
    /// address it listens on into the endpoint file of its region directory, where peers read it.
    case verbsDirectory(String)
    /// `verbs://ip:port/<absolute directory>`: RDMA verbs between hosts; the node listens on
    /// `ip:port` (`host:port`), and its region directory is the path on its own host.
    case verbsAddress(String, directory: String)

    /// The endpoint `text` is, or nil for one of no known form.
    public init?(_ text: String) {
        if text.hasPrefix("verbs://") {
            let rest = text.dropFirst("verbs://".count)
            guard let slash = rest.firstIndex(of: "/") else { return nil }
            let address = String(rest[..<slash])
            let directory = String(rest[slash...])
            guard let colon = address.lastIndex(of: ":"), colon != address.startIndex,
                  let port = Int(address[address.index(after: colon)...]), (1...65535).contains(port), directory.count > 1
            else { return nil }
            self = .verbsAddress(address, directory: directory)
        } else if text.hasPrefix("verbs:"), text.count > "verbs:".count {
            self = .verbsDirectory(String(text.dropFirst("verbs:".count)))
        } else if text.hasPrefix("shm:"), text.count > "shm:".count {
            self = .sharedMemory(directory: String(text.dropFirst("shm:".count)))
        } else {
            return nil
        }
    }

    /// The forms an endpoint takes, for error messages.
    public static let forms = "shm:<directory>, verbs:<directory> or verbs://ip:port/<absolute directory>"

    /// The node's region directory (on the node's own host).
    public var directory: String {
        switch self {
        case .sharedMemory(let directory), .verbsDirectory(let directory), .verbsAddress(_, let directory): return directory
        }
    }

    /// Whether the node is reached through RDMA verbs (`verbs:` or `verbs://`), not shared memory.
    public var isVerbs: Bool {
        if case .sharedMemory = self { return false }
        return true
    }

    /// Whether the node may be on another host (its files are not to be looked for on this one).
    public var isRemote: Bool {
        if case .verbsAddress = self { return true }
        return false
    }

    /// The endpoint with its directory `directory`, in the same form.
    public func with(directory: String) -> String {
        switch self {
        case .sharedMemory: return "shm:" + directory
        case .verbsDirectory: return "verbs:" + directory
        case .verbsAddress(let address, _): return "verbs://" + address + directory
        }
    }
}

/// Where a region's replicas live: one primary and its backups, all on distinct nodes.
public struct RegionPlacement: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The region placed.
    public var region: RegionID
    /// The node that holds the region's primary replica: transactions read from it, and LOCK and
    /// COMMIT-PRIMARY records go to it.
    public var primary: NodeID
    /// The nodes that hold backup replicas: COMMIT-BACKUP records go to them, and with a
    /// configuration manager one of them becomes primary if the primary fails.
    public var backups: [NodeID]
    /// Backups still copying the region from the primary (FaRM's data recovery): they receive and
    /// apply its records like any backup, but are not promoted until their copy is complete.
    public var copying: [NodeID]

    /// A placement of `region`; the configuration that holds it checks that the replicas are
    /// distinct members.
    ///
    /// - Parameters:
    ///   - region: the region placed.
    ///   - primary: the node holding its primary.
    ///   - backups: the nodes holding its backups.
    ///   - copying: those of `backups` still copying the region.
    public init(region: RegionID, primary: NodeID, backups: [NodeID], copying: [NodeID] = []) {
        self.region = region
        self.primary = primary
        self.backups = backups
        self.copying = copying
    }

    /// The primary, then the backups.
    public var replicas: [NodeID] { [primary] + backups }

    /// The backups whose copy is complete.
    public var completeBackups: [NodeID] { backups.filter { !copying.contains($0) } }

    private enum CodingKeys: String, CodingKey { case region, primary, backups, copying }

    /// Decodes a placement; a missing `copying` key means no backup is copying.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        region = try container.decode(RegionID.self, forKey: .region)
        primary = try container.decode(NodeID.self, forKey: .primary)
        backups = try container.decode([NodeID].self, forKey: .backups)
        copying = try container.decodeIfPresent([NodeID].self, forKey: .copying) ?? []
    }

    /// Encodes the placement, leaving out `copying` when it is empty.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(region, forKey: .region)
        try container.encode(primary, forKey: .primary)
        try container.encode(backups, forKey: .backups)
        if !copying.isEmpty { try container.encode(copying, forKey: .copying) }
    }

    /// The region, its primary and backups, and which backups are copying.
    public var description: String {
        "\(region): primary \(primary), backups \(backups.map(\.description).joined(separator: ","))"
            + (copying.isEmpty ? "" : " (copying: \(copying.map(\.description).joined(separator: ",")))")
    }
}

/// Why a configuration is not usable.
public enum ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The configuration, or what was asked of a cluster under it, is impossible (more replicas
    /// than members, an id out of range, a node that is not a member, ...); the string says why,
    /// naming the value at fault.
    case invalid(String)
    /// A record or message from another configuration.
    case wrongConfiguration(found: ConfigurationID, expected: ConfigurationID, from: NodeID)

    /// The error in a sentence.
    public var description: String {
        switch self {
        case .invalid(let reason): return "invalid configuration: \(reason)"
        case .wrongConfiguration(let found, let expected, let from):
            return "node \(from) sent a record of \(found), but this node is in \(expected); the record is rejected"
        }
    }
}

/// A configuration of the cluster: its members, and which nodes hold each region.
public struct Configuration: Hashable, Sendable, Codable, CustomStringConvertible {
    /// This configuration's number: every change takes the next one.
    public var id: ConfigurationID
    /// The cluster the configuration belongs to; its region files carry the same id.
    public var cluster: ClusterID
    /// The nodes in the configuration, and how peers reach them.
    public var members: [Member]
    /// The configuration manager, when one runs.
    public var manager: NodeID?
    /// Where every data region's replicas live.
    public var regions: [RegionPlacement]
    /// The size of every data region, in bytes.
    public var regionSize: Int
    /// How many replicas (FaRM's f + 1) the configuration manager keeps of every region: after a
    /// failure it places new backups up to this count, on the survivors or on nodes that join
    /// later. nil: the most replicas any region has (what a configuration file states).
    public var replication: Int?
    /// The first configuration whose routing this one keeps (``keepsRouting(in:)``), when its
    /// maker knows it: records stamped with that configuration or a later one route as this
    /// one's do, so a restart's recovery takes them from the logs. nil: this configuration's id.
    public var routingEpoch: ConfigurationID?

    /// A configuration, checked with ``validate()``; ``replication`` and ``routingEpoch`` start nil.
    ///
    /// - Parameters:
    ///   - id: its number.
    ///   - cluster: the cluster it belongs to.
    ///   - members: the nodes in it.
    ///   - manager: the configuration manager, if one runs.
    ///   - regions: the placement of every data region.
    ///   - regionSize: the size of every data region in bytes.
    /// - Throws: ``ConfigurationError/invalid(_:)`` naming the first value ``validate()`` refuses.
    public init(id: ConfigurationID, cluster: ClusterID, members: [Member], manager: NodeID? = nil,
                regions: [RegionPlacement], regionSize: Int) throws(ConfigurationError) {
        self.id = id
        self.cluster = cluster
        self.members = members
        self.manager = manager
        self.regions = regions
        self.regionSize = regionSize
        try validate()
    }

    /// The placement of `region`, if it is in this configuration.
    public func placement(of region: RegionID) -> RegionPlacement? {
        regions.first { $0.region == region }
    }

    /// Whether `node` is a member.
    public func contains(_ node: NodeID) -> Bool { members.contains { $0.node == node } }

    /// Whether `next` routes the commit protocol's records as this configuration does: no member
    /// leaves, no region is dropped, and every region keeps its primary and its backups. A change
    /// that keeps the routing (a new manager, a completed copy, a member or a region added) needs
    /// no transaction-state recovery: records sent in this configuration stay valid in `next`.
    public func keepsRouting(in next: Configuration) -> Bool {
        !members.contains { !next.contains($0.node) }
            && !regions.contains { next.placement(of: $0.region) == nil }
            && !next.regions.contains { placement in
                guard let old = self.placement(of: placement.region) else { return false }
                return old.primary != placement.primary || old.backups != placement.backups
            }
    }

    /// The regions whose routing `next` changes: those it drops or adds, and those whose primary
    /// or backups differ. FaRM's *recovering regions*: while the move to `next` is recovered,
    /// commits that touch only other regions go ahead.
    public func reroutedRegions(in next: Configuration) -> Set<RegionID> {
        var rerouted = Set<RegionID>()
        for placement in regions {
            guard let new = next.placement(of: placement.region), new.primary == placement.primary, new.backups == placement.backups else {
                rerouted.insert(placement.region)
                continue
            }
        }
        for placement in next.regions where self.placement(of: placement.region) == nil { rerouted.insert(placement.region) }
        return rerouted
    }

    private enum CodingKeys: String, CodingKey {
        case id, cluster, members, manager, regions, regionSize, replication, routingEpoch
    }

    /// Decodes a configuration (a `cluster.json`, a coordination record) and checks it
    /// (``validate()``): values the engine cannot hold are an error naming them, not a trap later.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(ConfigurationID.self, forKey: .id)
        cluster = try container.decode(ClusterID.self, forKey: .cluster)
        members = try container.decode([Member].self, forKey: .members)
        manager = try container.decodeIfPresent(NodeID.self, forKey: .manager)
        regions = try container.decode([RegionPlacement].self, forKey: .regions)
        regionSize = try container.decode(Int.self, forKey: .regionSize)
        replication = try container.decodeIfPresent(Int.self, forKey: .replication)
        routingEpoch = try container.decodeIfPresent(ConfigurationID.self, forKey: .routingEpoch)
        try validate()
    }

    /// The client members (``Member/client``): they coordinate transactions and allocate at
    /// other nodes' primaries, and hold no replica (`granary cluster init --clients K`,
    /// `Cluster.connect`).
    public var clients: [NodeID] { members.filter(\.client).map(\.node) }

    /// The members that may hold replicas and run the configuration manager: every member but
    /// the clients.
    public var servers: [NodeID] { members.filter { !$0.client }.map(\.node) }

    /// This configuration without its client members (a coordinated cluster starts without
    /// them: each joins when a process connects as it, and leaves when it stops).
    public var withoutClients: Configuration {
        var copy = self
        copy.members.removeAll(where: \.client)
        return copy
    }

    /// Checks that every id is one the engine can hold (nodes below `NodeID.limit`, data regions
    /// from 1 below `RegionID.limit`), the region size is a power of two from 1 MiB to 4 GiB,
    /// ids are unique, and replicas of one region sit on distinct member nodes.
    public func validate() throws(ConfigurationError) {
        for member in members where member.node.index >= NodeID.limit {
            throw .invalid("member \(member.node) has an id of \(NodeID.limit) or more (node ids are 0..<\(NodeID.limit))")
        }
        if let manager, manager.index >= NodeID.limit {
            throw .invalid("the manager \(manager) has an id of \(NodeID.limit) or more")
        }
        for placement in regions {
            guard placement.region.rawValue >= 1, placement.region.rawValue < UInt32(RegionID.limit) else {
                throw .invalid("region id \(placement.region.rawValue) is outside 1..<\(RegionID.limit)")
            }
            for node in placement.replicas where node.index >= NodeID.limit {
                throw .invalid("region \(placement.region) has a replica on \(node), an id of \(NodeID.limit) or more")
            }
        }
        if let routingEpoch, routingEpoch > id {
            throw .invalid("routingEpoch \(routingEpoch) is after the configuration's own id \(id)")
        }
        if let replication, replication < 1 || replication > NodeID.limit {
            throw .invalid("replication \(replication) is outside 1...\(NodeID.limit)")
        }
        guard regionSize >= 1 << 20, regionSize <= 1 << 32, regionSize & (regionSize - 1) == 0 else {
            throw .invalid("regionSize \(regionSize) is not a power of two from 1 MiB to 4 GiB")
        }
        let nodes = members.map(\.node)
        guard Set(nodes).count == nodes.count else { throw .invalid("a node is listed twice among the members") }
        guard Set(regions.map(\.region)).count == regions.count else { throw .invalid("a region is placed twice") }
        let clients = Set(self.clients)
        for placement in regions {
            let replicas = placement.replicas
            guard Set(replicas).count == replicas.count else {
                throw .invalid("region \(placement.region) has two replicas on one node (\(replicas))")
            }
            for node in replicas where !nodes.contains(node) {
                throw .invalid("region \(placement.region) has a replica on \(node), which is not a member")
            }
            for node in replicas where clients.contains(node) {
                throw .invalid("region \(placement.region) has a replica on \(node), a client member (clients hold no replica)")
            }
            for node in placement.copying where !placement.backups.contains(node) {
                throw .invalid("region \(placement.region) lists \(node) as copying, which is not one of its backups")
            }
        }
    }

    /// A new region led by `primary` (FaRM: the CM allocates regions on demand): the next region
    /// id, and `replicas` replicas (nil: ``replication``, else the most replicas any region has),
    /// the backups on the members holding the fewest replicas, ties broken by ring order after the
    /// primary, so that load stays balanced.
    ///
    /// - Throws: ``ConfigurationError/invalid(_:)`` when `primary` is not a member, the members
    ///   are fewer than the replicas, or every region id is in use.
    public func placingNewRegion(primary: NodeID, replicas: Int? = nil) throws(ConfigurationError) -> RegionPlacement {
        let id = (regions.map(\.region.rawValue).max() ?? 0) + 1
        guard id < UInt32(RegionID.limit) else {
            throw .invalid("the cluster has every region id in use (ids are below \(RegionID.limit))")
        }
        guard contains(primary) else { throw .invalid("\(primary) is not a member of \(self.id)") }
        guard !clients.contains(primary) else { throw .invalid("\(primary) is a client member of \(self.id): clients hold no region") }
        let count = replicas ?? replication ?? regions.map(\.replicas.count).max() ?? 1
        let nodes = servers.sorted()
        guard count >= 1, count <= nodes.count else {
            throw .invalid("\(count) replicas need \(count) members, \(self.id) has \(nodes.count)")
        }
        var held: [NodeID: Int] = [:]
        for placement in regions {
            for node in placement.replicas { held[node, default: 0] += 1 }
        }
        let start = nodes.firstIndex(of: primary) ?? 0
        let ring = (1..<nodes.count).map { nodes[(start + $0) % nodes.count] }
        let backups = ring.enumerated()
            .sorted { (held[$0.element] ?? 0, $0.offset) < (held[$1.element] ?? 0, $1.offset) }
            .prefix(count - 1)
            .map(\.element)
        return RegionPlacement(region: RegionID(rawValue: id), primary: primary, backups: backups)
    }

    /// Places `regionsPerNode` regions per node with `replicas` replicas each: every node is primary of
    /// the same number of regions, and the backups of a region are the next nodes in ring order, so
    /// backups are balanced too and never share a node with another replica of the region.
    public static func balancedPlacement(nodes: [NodeID], regionsPerNode: Int, replicas: Int,
                                         firstRegion: Int = 1) throws(ConfigurationError) -> [RegionPlacement] {
        guard replicas >= 1 else { throw .invalid("a region needs at least one replica") }
        guard regionsPerNode >= 0 else { throw .invalid("\(regionsPerNode) regions per node: the count cannot be negative") }
        guard replicas <= nodes.count else {
            throw .invalid("\(replicas) replicas need \(replicas) nodes, only \(nodes.count) given")
        }
        var placements: [RegionPlacement] = []
        var next = firstRegion
        for round in 0..<regionsPerNode {
            for (index, node) in nodes.enumerated() {
                // Alternate the backup order between rounds so each node backs up each other node.
                let backups = (1..<replicas).map { step in
                    nodes[(index + (round % 2 == 0 ? step : nodes.count - step)) % nodes.count]
                }
                placements.append(RegionPlacement(region: RegionID(next), primary: node, backups: backups))
                next += 1
            }
        }
        return placements
    }

    /// The id, the cluster, the members and every region's placement, on one line.
    public var description: String {
        "\(id) of \(cluster): members \(members.map(\.description).joined(separator: ", ")); "
            + regions.map(\.description).joined(separator: "; ")
    }
}
