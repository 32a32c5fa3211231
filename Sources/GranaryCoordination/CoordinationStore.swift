/// How a node is created in a coordination store (ZooKeeper's create modes).
public struct CreateMode: OptionSet, Sendable, Hashable {
    /// The mode's flags: 1 ephemeral, 2 sequential.
    public let rawValue: Int
    /// The mode with flags `rawValue`.
    public init(rawValue: Int) { self.rawValue = rawValue }
    /// Deleted when the creating session ends (closed or expired).
    public static let ephemeral = CreateMode(rawValue: 1)
    /// A 10-digit, monotonically increasing counter of the parent is appended to the name.
    public static let sequential = CreateMode(rawValue: 2)
    /// Neither: the node stays until it is deleted.
    public static let persistent: CreateMode = []
}

/// A node's data and version.
public struct StoredData: Sendable, Equatable {
    /// The node's data.
    public var data: [UInt8]
    /// Increases by one with every successful set (starts at 0).
    public var version: Int32
    /// A node's `data` at `version`.
    ///
    /// - Parameters:
    ///   - data: the node's data.
    ///   - version: its version.
    public init(data: [UInt8], version: Int32) {
        self.data = data
        self.version = version
    }
}

/// What fired a one-shot watch.
public enum WatchEvent: Sendable, Equatable {
    /// The node at this path was created.
    case created(String)
    /// The node at this path was deleted.
    case deleted(String)
    /// The data of the node at this path was set.
    case dataChanged(String)
    /// A child of the node at this path was created or deleted.
    case childrenChanged(String)
    /// The session ended before the watch fired.
    case sessionEnded
}

/// One operation of an atomic ``CoordinationStore/multi(_:)``.
public enum CoordinationOperation: Sendable, Equatable {
    /// Creates the node, as ``CoordinationStore/create(_:data:mode:)`` does.
    case create(path: String, data: [UInt8], mode: CreateMode)
    /// Sets the node's data if it is at `expectedVersion` (any version when nil), as
    /// ``CoordinationStore/set(_:data:expectedVersion:)`` does.
    case set(path: String, data: [UInt8], expectedVersion: Int32?)
    /// Deletes the node if it is at `expectedVersion` (any version when nil) and has no
    /// children, as ``CoordinationStore/delete(_:expectedVersion:)`` does.
    case delete(path: String, expectedVersion: Int32?)
    /// Fails the whole multi unless the node exists at this version.
    case check(path: String, version: Int32)
}

/// Why a coordination-store call failed. Each case names the path or the session.
public enum CoordinationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No node at this path (or, for a create, at its parent).
    case noNode(String)
    /// A node already exists at this path: the create lost, or the node was made before.
    case nodeExists(String)
    /// A compare-and-set lost: the node is at another version.
    case badVersion(path: String, expected: Int32, actual: Int32)
    /// The node at this path has children, so it cannot be deleted.
    case notEmpty(String)
    /// Ephemeral nodes cannot have children.
    case noChildrenForEphemerals(String)
    /// The path is malformed (it must be absolute, `/`-separated, without empty, `.` or `..`
    /// components or a trailing `/`), or the operation is not allowed on it; the reason says which.
    case invalidPath(String, reason: String)
    /// The connection to the store was lost; the session may still be alive.
    case connectionLoss(String)
    /// The session expired: its ephemeral nodes are gone and it must be re-created.
    case sessionExpired
    /// A multi failed at operation `index` (nothing was applied).
    case multiFailed(index: Int, CoordinationFailure)
    /// Any other error of the backend.
    case backend(String)

    /// The error in a sentence naming the path or the session.
    public var description: String {
        switch self {
        case .noNode(let path): return "no node \(path)"
        case .nodeExists(let path): return "node \(path) already exists"
        case .badVersion(let path, let expected, let actual):
            return "stale version for \(path): expected \(expected), the node is at \(actual)"
        case .notEmpty(let path): return "node \(path) has children"
        case .noChildrenForEphemerals(let path): return "\(path) is ephemeral and cannot have children"
        case .invalidPath(let path, let reason): return "invalid path '\(path)': \(reason)"
        case .connectionLoss(let detail): return "connection to the coordination store lost: \(detail)"
        case .sessionExpired: return "the coordination session expired"
        case .multiFailed(let index, let failure): return "atomic multi-operation failed at operation \(index): \(failure.error)"
        case .backend(let detail): return "coordination store error: \(detail)"
        }
    }
}

/// Boxes a ``CoordinationError`` inside ``CoordinationError/multiFailed(index:_:)`` (enums cannot
/// contain themselves directly).
public final class CoordinationFailure: Sendable, Equatable {
    /// The error the failed operation met.
    public let error: CoordinationError
    /// A box holding `error`.
    public init(_ error: CoordinationError) { self.error = error }
    /// Whether the two boxes hold equal errors.
    ///
    /// - Parameters:
    ///   - a: a box.
    ///   - b: the box it is compared with.
    public static func == (a: CoordinationFailure, b: CoordinationFailure) -> Bool { a.error == b.error }
}

/// A session with a coordination store in ZooKeeper's model: a tree of nodes with data and
/// versions, compare-and-set, ephemeral and sequential nodes, one-shot watches and atomic
/// multi-operations. Granary uses it only so that nodes agree on the configuration.
///
/// Two backends implement it and pass one conformance suite: ``EmbeddedCoordinationService``
/// (in-process, the default for embedded clusters) and ZooKeeper through its C client.
public protocol CoordinationStore: Sendable {
    /// Creates `path` (its parent must exist). Returns the created path (with the sequence
    /// suffix for sequential nodes).
    func create(_ path: String, data: [UInt8], mode: CreateMode) async throws(CoordinationError) -> String
    /// The node's data and version.
    func get(_ path: String) async throws(CoordinationError) -> StoredData
    /// The node's data and version, and a one-shot watch that fires on its next change or deletion.
    func getAndWatch(_ path: String) async throws(CoordinationError) -> (StoredData, CoordinationWatch)
    /// Whether the node exists (its version), and a one-shot watch on its creation, change or deletion.
    func existsAndWatch(_ path: String) async throws(CoordinationError) -> (Int32?, CoordinationWatch)
    /// Replaces the node's data if its version is `expectedVersion` (any version when nil).
    /// Returns the new version.
    @discardableResult
    func set(_ path: String, data: [UInt8], expectedVersion: Int32?) async throws(CoordinationError) -> Int32
    /// Deletes the node if its version is `expectedVersion` (any when nil) and it has no children.
    func delete(_ path: String, expectedVersion: Int32?) async throws(CoordinationError)
    /// The names (not paths) of the node's children, sorted.
    func children(_ path: String) async throws(CoordinationError) -> [String]
    /// The children and a one-shot watch on the next change of the set of children.
    func childrenAndWatch(_ path: String) async throws(CoordinationError) -> ([String], CoordinationWatch)
    /// Applies every operation, or none of them.
    func multi(_ operations: [CoordinationOperation]) async throws(CoordinationError)
    /// Ends the session: its ephemeral nodes are deleted.
    func close() async
}

extension CoordinationStore {
    /// Whether `path` exists.
    public func exists(_ path: String) async throws(CoordinationError) -> Bool {
        do {
            _ = try await get(path)
            return true
        } catch .noNode {
            return false
        }
    }

    /// Creates `path` and any missing ancestors as persistent nodes (existing ones are kept).
    public func createParents(_ path: String) async throws(CoordinationError) {
        var prefix = ""
        for component in path.split(separator: "/") {
            prefix += "/" + component
            do {
                _ = try await create(prefix, data: [], mode: .persistent)
            } catch .nodeExists {
                continue
            }
        }
    }
}

/// A one-shot watch: ``event()`` returns once, when the watched thing changes.
public final class CoordinationWatch: Sendable {
    private let stream: AsyncStream<WatchEvent>
    private let continuation: AsyncStream<WatchEvent>.Continuation

    /// A watch that has not fired; a store fires it with ``fire(_:)``.
    public init() {
        (stream, continuation) = AsyncStream.makeStream(of: WatchEvent.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Fires the watch (the first call wins).
    public func fire(_ event: WatchEvent) {
        continuation.yield(event)
        continuation.finish()
    }

    /// The event, waiting for it.
    public func event() async -> WatchEvent {
        for await event in stream { return event }
        return .sessionEnded
    }
}

/// Paths: absolute, "/"-separated, no empty or "." components, no trailing slash.
enum CoordinationPath {
    static func validate(_ path: String) throws(CoordinationError) {
        guard path.hasPrefix("/") else { throw .invalidPath(path, reason: "paths start with /") }
        guard path == "/" || !path.hasSuffix("/") else { throw .invalidPath(path, reason: "no trailing /") }
        for component in path.split(separator: "/", omittingEmptySubsequences: false).dropFirst() where path != "/" {
            guard !component.isEmpty, component != ".", component != ".." else {
                throw .invalidPath(path, reason: "empty, . or .. component")
            }
        }
    }

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }

    static func name(_ path: String) -> String {
        String(path[path.index(after: path.lastIndex(of: "/")!)...])
    }
}
