import Synchronization

/// The embedded coordination store: ZooKeeper's data model, in this process. It is the default
/// store of embedded clusters and passes the same conformance suite as the ZooKeeper backend.
///
/// Sessions are handles from ``session()``; a session ends when it is closed or expired
/// (``expire(_:)``), which deletes its ephemeral nodes and fires the watches on them.
public final class EmbeddedCoordinationService: Sendable {
    struct Node {
        var data: [UInt8]
        var version: Int32
        var owner: UInt64?  // session of an ephemeral node
        var children: Set<String> = []
        var nextSequence: Int32 = 0
    }

    struct State {
        var nodes: [String: Node] = ["/": Node(data: [], version: 0, owner: nil)]
        /// Watches by path, each with the session that set it: a session that ends fires its own
        /// with ``WatchEvent/sessionEnded``, as ZooKeeper does.
        var dataWatches: [String: [(watch: CoordinationWatch, session: UInt64)]] = [:]
        var childWatches: [String: [(watch: CoordinationWatch, session: UInt64)]] = [:]
        var liveSessions: Set<UInt64> = []
        var nextSession: UInt64 = 1
    }

    let state = Mutex(State())
    /// Called with every write of a persistent node's data (`set`, alone or in a `multi`), under
    /// the store's lock, after the version check and before the write is visible to anyone: the
    /// write succeeds only if this returns. What ZooKeeper's own log gives its data, an embedded
    /// cluster gets by writing what it must find after a crash (its configuration) here.
    let persisting: (@Sendable (_ path: String, _ data: [UInt8]) throws(CoordinationError) -> Void)?

    /// An empty store: only the root node `/`, no session.
    public init() { persisting = nil }

    /// An empty store whose persistent nodes' writes also go through `persisting`: it is called
    /// with each write of a persistent node's data (`set`, alone or in a `multi`), under the
    /// store's lock, after the version check and before the write is visible to anyone; a write
    /// it refuses (by throwing) fails and changes nothing.
    public init(persisting: @escaping @Sendable (_ path: String, _ data: [UInt8]) throws(CoordinationError) -> Void) {
        self.persisting = persisting
    }

    /// Opens a session.
    public func session() -> EmbeddedCoordinationSession {
        let id = state.withLock { state -> UInt64 in
            let id = state.nextSession
            state.nextSession += 1
            state.liveSessions.insert(id)
            return id
        }
        return EmbeddedCoordinationSession(service: self, id: id)
    }

    /// Expires a session as if its holder had stopped answering: its ephemeral nodes go, and every
    /// later call on it fails with ``CoordinationError/sessionExpired``.
    public func expire(_ session: EmbeddedCoordinationSession) { end(session.id) }

    func end(_ id: UInt64) {
        var fired: [(CoordinationWatch, WatchEvent)] = []
        state.withLock { state in
            guard state.liveSessions.remove(id) != nil else { return }
            let owned = state.nodes.filter { $0.value.owner == id }.map(\.key)
            for path in owned {
                _ = try? Self.remove(path, expectedVersion: nil, in: &state, fired: &fired)
            }
            // The session's own watches that are still set end with it.
            for path in Array(state.dataWatches.keys) {
                let (mine, others) = state.dataWatches[path]!.partitioned { $0.session == id }
                state.dataWatches[path] = others.isEmpty ? nil : others
                fired += mine.map { ($0.watch, .sessionEnded) }
            }
            for path in Array(state.childWatches.keys) {
                let (mine, others) = state.childWatches[path]!.partitioned { $0.session == id }
                state.childWatches[path] = others.isEmpty ? nil : others
                fired += mine.map { ($0.watch, .sessionEnded) }
            }
        }
        for (watch, event) in fired { watch.fire(event) }
    }

    func isLive(_ id: UInt64) -> Bool { state.withLock { $0.liveSessions.contains(id) } }

    // MARK: Operations on the state (all under the lock)

    static func create(_ path: String, data: [UInt8], mode: CreateMode, session: UInt64, in state: inout State,
                       fired: inout [(CoordinationWatch, WatchEvent)]) throws(CoordinationError) -> String {
        try CoordinationPath.validate(path)
        guard path != "/" else { throw .nodeExists(path) }
        let parentPath = CoordinationPath.parent(path)
        guard var parent = state.nodes[parentPath] else { throw .noNode(parentPath) }
        guard parent.owner == nil else { throw .noChildrenForEphemerals(parentPath) }
        var created = path
        if mode.contains(.sequential) {
            let number = String(parent.nextSequence)
            created = path + String(repeating: "0", count: max(0, 10 - number.count)) + number
            parent.nextSequence += 1
        }
        guard state.nodes[created] == nil else { throw .nodeExists(created) }
        state.nodes[created] = Node(data: data, version: 0, owner: mode.contains(.ephemeral) ? session : nil)
        parent.children.insert(CoordinationPath.name(created))
        state.nodes[parentPath] = parent
        for (watch, _) in state.dataWatches.removeValue(forKey: created) ?? [] { fired.append((watch, .created(created))) }
        for (watch, _) in state.childWatches.removeValue(forKey: parentPath) ?? [] { fired.append((watch, .childrenChanged(parentPath))) }
        return created
    }

    static func set(_ path: String, data: [UInt8], expectedVersion: Int32?, in state: inout State,
                    fired: inout [(CoordinationWatch, WatchEvent)]) throws(CoordinationError) -> Int32 {
        guard var node = state.nodes[path] else { throw .noNode(path) }
        if let expectedVersion, expectedVersion != node.version {
            throw .badVersion(path: path, expected: expectedVersion, actual: node.version)
        }
        node.data = data
        node.version += 1
        state.nodes[path] = node
        for (watch, _) in state.dataWatches.removeValue(forKey: path) ?? [] { fired.append((watch, .dataChanged(path))) }
        return node.version
    }

    static func remove(_ path: String, expectedVersion: Int32?, in state: inout State,
                       fired: inout [(CoordinationWatch, WatchEvent)]) throws(CoordinationError) {
        guard path != "/" else { throw .invalidPath(path, reason: "the root cannot be deleted") }
        guard let node = state.nodes[path] else { throw .noNode(path) }
        if let expectedVersion, expectedVersion != node.version {
            throw .badVersion(path: path, expected: expectedVersion, actual: node.version)
        }
        guard node.children.isEmpty else { throw .notEmpty(path) }
        state.nodes[path] = nil
        let parentPath = CoordinationPath.parent(path)
        state.nodes[parentPath]?.children.remove(CoordinationPath.name(path))
        for (watch, _) in state.dataWatches.removeValue(forKey: path) ?? [] { fired.append((watch, .deleted(path))) }
        for (watch, _) in state.childWatches.removeValue(forKey: path) ?? [] { fired.append((watch, .deleted(path))) }
        for (watch, _) in state.childWatches.removeValue(forKey: parentPath) ?? [] { fired.append((watch, .childrenChanged(parentPath))) }
    }
}

/// A session of an ``EmbeddedCoordinationService``.
public final class EmbeddedCoordinationSession: CoordinationStore {
    let service: EmbeddedCoordinationService
    let id: UInt64

    init(service: EmbeddedCoordinationService, id: UInt64) {
        self.service = service
        self.id = id
    }

    /// Runs `body` on the service state if the session is live, then fires collected watches.
    private func withState<R>(_ body: (inout EmbeddedCoordinationService.State, inout [(CoordinationWatch, WatchEvent)]) throws(CoordinationError) -> R) throws(CoordinationError) -> R {
        var fired: [(CoordinationWatch, WatchEvent)] = []
        let id = self.id
        let result: Result<R, CoordinationError> = service.state.withLock { state in
            guard state.liveSessions.contains(id) else { return .failure(.sessionExpired) }
            do throws(CoordinationError) {
                return .success(try body(&state, &fired))
            } catch {
                return .failure(error)
            }
        }
        for (watch, event) in fired { watch.fire(event) }
        return try result.get()
    }

    public func create(_ path: String, data: [UInt8], mode: CreateMode) async throws(CoordinationError) -> String {
        let id = self.id
        return try withState { state, fired throws(CoordinationError) in
            try EmbeddedCoordinationService.create(path, data: data, mode: mode, session: id, in: &state, fired: &fired)
        }
    }

    public func get(_ path: String) async throws(CoordinationError) -> StoredData {
        try withState { state, _ throws(CoordinationError) in
            guard let node = state.nodes[path] else { throw .noNode(path) }
            return StoredData(data: node.data, version: node.version)
        }
    }

    public func getAndWatch(_ path: String) async throws(CoordinationError) -> (StoredData, CoordinationWatch) {
        try withState { state, _ throws(CoordinationError) in
            guard let node = state.nodes[path] else { throw .noNode(path) }
            let watch = CoordinationWatch()
            state.dataWatches[path, default: []].append((watch, id))
            return (StoredData(data: node.data, version: node.version), watch)
        }
    }

    public func existsAndWatch(_ path: String) async throws(CoordinationError) -> (Int32?, CoordinationWatch) {
        try withState { state, _ throws(CoordinationError) in
            try CoordinationPath.validate(path)
            let watch = CoordinationWatch()
            state.dataWatches[path, default: []].append((watch, id))
            return (state.nodes[path]?.version, watch)
        }
    }

    public func set(_ path: String, data: [UInt8], expectedVersion: Int32?) async throws(CoordinationError) -> Int32 {
        let persisting = service.persisting
        return try withState { state, fired throws(CoordinationError) in
            // Persisted once the write is certain to succeed (the node exists at the version
            // expected), before it changes anything.
            if let persisting, let node = state.nodes[path], node.owner == nil, expectedVersion.map({ $0 == node.version }) ?? true {
                try persisting(path, data)
            }
            return try EmbeddedCoordinationService.set(path, data: data, expectedVersion: expectedVersion, in: &state, fired: &fired)
        }
    }

    public func delete(_ path: String, expectedVersion: Int32?) async throws(CoordinationError) {
        try withState { state, fired throws(CoordinationError) in
            try EmbeddedCoordinationService.remove(path, expectedVersion: expectedVersion, in: &state, fired: &fired)
        }
    }

    public func children(_ path: String) async throws(CoordinationError) -> [String] {
        try withState { state, _ throws(CoordinationError) in
            guard let node = state.nodes[path] else { throw .noNode(path) }
            return node.children.sorted()
        }
    }

    public func childrenAndWatch(_ path: String) async throws(CoordinationError) -> ([String], CoordinationWatch) {
        try withState { state, _ throws(CoordinationError) in
            guard let node = state.nodes[path] else { throw .noNode(path) }
            let watch = CoordinationWatch()
            state.childWatches[path, default: []].append((watch, id))
            return (node.children.sorted(), watch)
        }
    }

    public func multi(_ operations: [CoordinationOperation]) async throws(CoordinationError) {
        let id = self.id
        try withState { state, fired throws(CoordinationError) in
            // Apply to a copy; commit only if every operation succeeds.
            var scratch = state
            var scratchFired: [(CoordinationWatch, WatchEvent)] = []
            for (index, operation) in operations.enumerated() {
                do throws(CoordinationError) {
                    switch operation {
                    case .create(let path, let data, let mode):
                        _ = try EmbeddedCoordinationService.create(path, data: data, mode: mode, session: id, in: &scratch, fired: &scratchFired)
                    case .set(let path, let data, let expectedVersion):
                        _ = try EmbeddedCoordinationService.set(path, data: data, expectedVersion: expectedVersion, in: &scratch, fired: &scratchFired)
                    case .delete(let path, let expectedVersion):
                        try EmbeddedCoordinationService.remove(path, expectedVersion: expectedVersion, in: &scratch, fired: &scratchFired)
                    case .check(let path, let version):
                        guard let node = scratch.nodes[path] else { throw .noNode(path) }
                        guard node.version == version else { throw .badVersion(path: path, expected: version, actual: node.version) }
                    }
                } catch {
                    throw .multiFailed(index: index, CoordinationFailure(error))
                }
            }
            if let persisting = service.persisting {
                for case .set(let path, let data, _) in operations where scratch.nodes[path]?.owner == nil {
                    try persisting(path, data)
                }
            }
            state = scratch
            fired += scratchFired
        }
    }

    public func close() async { service.end(id) }
}

extension Array {
    /// The elements that satisfy `belongs`, and the others, each in order.
    fileprivate func partitioned(_ belongs: (Element) -> Bool) -> (matching: [Element], rest: [Element]) {
        var matching: [Element] = [], rest: [Element] = []
        for element in self { if belongs(element) { matching.append(element) } else { rest.append(element) } }
        return (matching, rest)
    }
}
