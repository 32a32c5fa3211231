import Foundation
import GranaryMemory

/// A cluster file (`cluster.json`, written by `granary cluster init` or by hand): the cluster's
/// first configuration (the members and their endpoints, the regions and their replicas, the
/// region size) and how its node processes run: the coordination store of the configuration
/// manager and the lease. One JSON object:
///
/// ```json
/// {
///   "cluster": 11027935214873471659, "id": 1, "manager": 0, "regionSize": 67108864, "replication": 3,
///   "members": [{ "node": 0, "endpoint": "shm:n0" }, ...],
///   "regions": [{ "region": 1, "primary": 0, "backups": [1, 2] }, ...],
///   "coordination": "zookeeper://127.0.0.1:2181",
///   "leaseMilliseconds": 10
/// }
/// ```
///
/// `coordination` and `leaseMilliseconds` are optional: without `coordination`, node processes
/// need `--coordination` or `--static`; without `leaseMilliseconds`, leases are 10 ms. Command-line
/// options override both. Relative endpoint directories resolve against the file's directory.
/// Endpoints are `shm:<directory>`, `verbs:<directory>` (verbs between nodes of one host) or
/// `verbs://ip:port/<absolute directory>` (verbs between hosts: the node listens on `ip:port`,
/// and the directory is on its own host); see ``MemberEndpoint``.
public struct ClusterFile: Sendable, Equatable, Codable {
    /// The cluster's first configuration.
    public var configuration: Configuration
    /// The configuration manager's coordination store, `zookeeper://host:port[,host:port...]`;
    /// nil: none is named (node processes then need `--coordination` or `--static`).
    public var coordination: String?
    /// The lease between the configuration manager and each member, in milliseconds (1 to
    /// 60,000); nil: the default, 10.
    public var leaseMilliseconds: Int?

    /// A cluster file holding `configuration`, checked as a loaded one is.
    ///
    /// - Throws: ``ConfigurationError/invalid(_:)`` naming the field at fault.
    public init(configuration: Configuration, coordination: String? = nil, leaseMilliseconds: Int? = nil) throws(ConfigurationError) {
        self.configuration = configuration
        self.coordination = coordination
        self.leaseMilliseconds = leaseMilliseconds
        try validate()
    }

    private enum CodingKeys: String, CodingKey { case coordination, leaseMilliseconds }

    /// Decodes the configuration's fields and the file's own from one JSON object, and checks
    /// them (``validate()``).
    public init(from decoder: any Decoder) throws {
        configuration = try Configuration(from: decoder)
        let container = try decoder.container(keyedBy: CodingKeys.self)
        coordination = try container.decodeIfPresent(String.self, forKey: .coordination)
        leaseMilliseconds = try container.decodeIfPresent(Int.self, forKey: .leaseMilliseconds)
        try validate()
    }

    /// Encodes the configuration's fields and the file's own into one JSON object.
    public func encode(to encoder: any Encoder) throws {
        try configuration.encode(to: encoder)
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encodeIfPresent(coordination, forKey: .coordination)
        try container.encodeIfPresent(leaseMilliseconds, forKey: .leaseMilliseconds)
    }

    /// Checks the file's own fields (the configuration checks itself): `coordination` is
    /// `zookeeper://` and at least one `host:port` with a port from 1 to 65535,
    /// `leaseMilliseconds` is from 1 to 60,000, and every member's endpoint has one of the
    /// forms of ``MemberEndpoint``.
    public func validate() throws(ConfigurationError) {
        try configuration.validate()
        for (index, member) in configuration.members.enumerated() where MemberEndpoint(member.endpoint) == nil {
            throw .invalid("members[\(index)].endpoint is '\(member.endpoint)': an endpoint is \(MemberEndpoint.forms) (a port from 1 to 65535)")
        }
        if let coordination { _ = try Self.zooKeeperAddress(coordination) }
        if let leaseMilliseconds, !(1...60_000).contains(leaseMilliseconds) {
            throw .invalid("leaseMilliseconds is \(leaseMilliseconds): a lease is 1 to 60000 ms")
        }
    }

    /// The `host:port[,host:port...]` of a `zookeeper://` address.
    ///
    /// - Throws: ``ConfigurationError/invalid(_:)`` naming the field `coordination` and what is wrong.
    public static func zooKeeperAddress(_ text: String) throws(ConfigurationError) -> String {
        guard text.hasPrefix("zookeeper://") else {
            throw .invalid("coordination is '\(text)': it must be zookeeper://host:port (a ZooKeeper ensemble; leave it out for --static)")
        }
        let hosts = String(text.dropFirst("zookeeper://".count))
        let parts = hosts.split(separator: ",", omittingEmptySubsequences: false)
        for part in parts {
            guard let colon = part.lastIndex(of: ":"), colon != part.startIndex,
                  let port = Int(part[part.index(after: colon)...]), (1...65535).contains(port) else {
                throw .invalid("coordination is '\(text)': '\(part)' is not host:port with a port from 1 to 65535")
            }
        }
        return hosts
    }

    /// Reads and checks the cluster file at `path`.
    ///
    /// - Throws: ``ConfigurationError/invalid(_:)`` naming the file and, for a value that is
    ///   wrong or missing, the field (`members[1].endpoint`, `coordination`, ...).
    public static func load(_ path: String) throws(ConfigurationError) -> ClusterFile {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw .invalid("cannot read the cluster file \(path): \(error.localizedDescription)")
        }
        do {
            return try JSONDecoder().decode(ClusterFile.self, from: data)
        } catch let error as ConfigurationError {
            guard case .invalid(let reason) = error else { throw error }
            throw .invalid("\(path): \(reason)")
        } catch let error as DecodingError {
            throw .invalid("\(path): \(Self.describe(error))")
        } catch {
            throw .invalid("\(path): \(error)")
        }
    }

    /// A decoding error in words, naming the field by its path (`members[1].node`).
    static func describe(_ error: DecodingError) -> String {
        func path(_ codingPath: [any CodingKey]) -> String {
            var text = ""
            for key in codingPath {
                if let index = key.intValue { text += "[\(index)]" } else { text += (text.isEmpty ? "" : ".") + key.stringValue }
            }
            return text.isEmpty ? "the top level" : text
        }
        switch error {
        case .keyNotFound(let key, let context):
            let parent = path(context.codingPath)
            return "\(parent == "the top level" ? "" : parent + ".")\(key.stringValue) is missing"
        case .typeMismatch(let type, let context):
            return "\(path(context.codingPath)) is not a \(type == String.self ? "string" : type == Bool.self ? "boolean" : type is any Numeric.Type ? "number" : "\(type)")"
        case .valueNotFound(let type, let context):
            return "\(path(context.codingPath)) is null where a \(type) is expected"
        case .dataCorrupted(let context):
            return context.codingPath.isEmpty
                ? "not JSON (\(context.underlyingError.map { "\($0)" } ?? context.debugDescription))"
                : "\(path(context.codingPath)): \(context.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }
}
