import CZooKeeper
import GranaryCoordination
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A session with an Apache ZooKeeper ensemble through its C client (libzookeeper_mt), as a
/// `CoordinationStore`.
///
/// Calls are the client's synchronous API (one round trip each to the server). Connection loss,
/// session expiry and stale versions are typed `CoordinationError`s.
///
/// `@unchecked Sendable`: the multi-threaded C client's handle may be used from any thread; the
/// Swift-side state is behind a mutex.
public final class ZooKeeperStore: CoordinationStore, @unchecked Sendable {
    /// The servers this session connects to, `host:port` separated by commas.
    public let connectString: String
    private let handle: OpaquePointer
    private let session: SessionState

    /// The session events the global watcher sees.
    final class SessionState: @unchecked Sendable {
        // Fields behind the mutex; the C client calls `event` from its own thread.
        let state = Mutex<(connected: Bool, expired: Bool)>((false, false))
        func event(_ state: Int32) {
            self.state.withLock { value in
                if state == CZooKeeper_connected_state() { value.connected = true }
                if state == CZooKeeper_expired_session_state() { value.expired = true }
            }
        }
    }

    /// Connects to `connectString` (e.g. "127.0.0.1:2181") and waits for the session.
    ///
    /// - Parameters:
    ///   - connectString: the servers, `host:port` separated by commas.
    ///   - sessionTimeout: the session timeout asked of the server.
    ///   - connectTimeout: how long to wait for the session.
    ///   - resuming: a session (id, password) to attach to instead of creating one.
    /// - Throws: `CoordinationError.connectionLoss(_:)` when no session is established within
    ///   `connectTimeout`.
    public init(connectString: String, sessionTimeout: Duration = .seconds(10), connectTimeout: Duration = .seconds(15),
                resuming: (id: Int64, password: [CChar])? = nil) throws(CoordinationError) {
        zoo_set_debug_level(ZOO_LOG_LEVEL_ERROR)
        self.connectString = connectString
        let session = SessionState()
        self.session = session
        // Unretained: `self.session` (or, until init returns, `session`) holds the state for as
        // long as the handle lives, and zookeeper_close, before either goes, ends the callbacks.
        // (A retained context was never released: one SessionState leaked per store.)
        let context = Unmanaged.passUnretained(session).toOpaque()
        let timeoutMilliseconds = Int32(sessionTimeout.components.seconds * 1000 + sessionTimeout.components.attoseconds / 1_000_000_000_000_000)
        var client = clientid_t()
        if let resuming {
            client.client_id = resuming.id
            withUnsafeMutableBytes(of: &client.passwd) { raw in
                for (index, byte) in resuming.password.prefix(raw.count).enumerated() { raw[index] = UInt8(bitPattern: byte) }
            }
        }
        let created = withUnsafePointer(to: &client) { clientPointer in
            zookeeper_init(connectString, { _, type, state, _, context in
                guard let context, type == CZooKeeper_session_event() else { return }
                Unmanaged<SessionState>.fromOpaque(context).takeUnretainedValue().event(state)
            }, timeoutMilliseconds, resuming == nil ? nil : clientPointer, context, 0)
        }
        guard let created else {
            throw .connectionLoss("zookeeper_init(\(connectString)) failed: \(String(cString: strerror(errno)))")
        }
        handle = created
        let deadline = ContinuousClock.now + connectTimeout
        while !session.state.withLock({ $0.connected || $0.expired }) {
            guard ContinuousClock.now < deadline else {
                zookeeper_close(handle)
                throw .connectionLoss("no ZooKeeper session with \(connectString) within \(connectTimeout)")
            }
            usleep(5_000)
        }
        if session.state.withLock({ $0.expired }) {
            zookeeper_close(handle)
            throw .sessionExpired
        }
    }

    /// The session's id and password (to attach a second handle, e.g. to force expiry in tests).
    public var sessionCredentials: (id: Int64, password: [CChar]) {
        let client = zoo_client_id(handle)!.pointee
        let password = withUnsafeBytes(of: client.passwd) { raw in raw.map { CChar(bitPattern: $0) } }
        return (client.client_id, password)
    }

    private func check(_ rc: Int32, _ path: String) throws(CoordinationError) {
        guard rc != ZOK.rawValue else { return }
        // After expiry the C client answers every call with ZINVALIDSTATE; the session watcher
        // recorded why.
        if rc == ZINVALIDSTATE.rawValue, session.state.withLock({ $0.expired }) { throw .sessionExpired }
        throw Self.error(rc, path: path)
    }

    static func error(_ rc: Int32, path: String) -> CoordinationError {
        switch rc {
        case ZNONODE.rawValue: return .noNode(path)
        case ZNODEEXISTS.rawValue: return .nodeExists(path)
        case ZNOTEMPTY.rawValue: return .notEmpty(path)
        case ZNOCHILDRENFOREPHEMERALS.rawValue: return .noChildrenForEphemerals(path)
        case ZBADARGUMENTS.rawValue: return .invalidPath(path, reason: "ZooKeeper refused the arguments")
        case ZSESSIONEXPIRED.rawValue: return .sessionExpired
        case ZCONNECTIONLOSS.rawValue, ZOPERATIONTIMEOUT.rawValue, ZINVALIDSTATE.rawValue:
            return .connectionLoss("\(String(cString: zerror(rc))) during an operation on \(path)")
        default: return .backend("\(String(cString: zerror(rc))) on \(path)")
        }
    }

    /// A stale-version error with the version actually found.
    private func badVersion(_ path: String, expected: Int32) -> CoordinationError {
        var stat = Stat()
        let rc = zoo_exists(handle, path, 0, &stat)
        return rc == ZOK.rawValue ? .badVersion(path: path, expected: expected, actual: stat.version) : Self.error(rc, path: path)
    }

    private func flags(_ mode: CreateMode) -> Int32 {
        (mode.contains(.ephemeral) ? CZooKeeper_ephemeral() : 0) | (mode.contains(.sequential) ? CZooKeeper_sequence() : 0)
    }

    /// Creates `path` with `data` (`zoo_create`, open ACL); its parent must exist.
    ///
    /// - Parameters:
    ///   - path: the node to create; for a sequential node, the prefix of its name.
    ///   - data: the node's data.
    ///   - mode: ephemeral, sequential, both, or persistent.
    /// - Returns: the created path, with the sequence suffix for a sequential node.
    /// - Throws: `CoordinationError.nodeExists(_:)`; `noNode(_:)` or `noChildrenForEphemerals(_:)`
    ///   naming the parent; `sessionExpired` after expiry or ``close()``; `connectionLoss(_:)`.
    public func create(_ path: String, data: [UInt8], mode: CreateMode) async throws(CoordinationError) -> String {
        try enter()
        defer { leave() }
        var created = [CChar](repeating: 0, count: path.utf8.count + 32)
        let rc = data.withUnsafeBytes { bytes in
            zoo_create(handle, path, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(data.count),
                       CZooKeeper_open_acl(), flags(mode), &created, Int32(created.count))
        }
        if rc == ZNOCHILDRENFOREPHEMERALS.rawValue || rc == ZNONODE.rawValue {
            // Both are about the parent, as the embedded store reports them.
            let parent = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? path
            throw rc == ZNONODE.rawValue ? .noNode(parent) : .noChildrenForEphemerals(parent)
        }
        try check(rc, path)
        return String(decoding: created.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// zoo_wget with a buffer that grows to the node's size.
    private func read(_ path: String, watch: CoordinationWatch?) throws(CoordinationError) -> StoredData {
        try enter()
        defer { leave() }
        var capacity = 4096
        var watch = watch
        while true {
            var buffer = [CChar](repeating: 0, count: capacity)
            var length = Int32(capacity)
            var stat = Stat()
            // The watch holds one retain until it fires (the watcher takes it back).
            let context = watch.map { Unmanaged.passRetained($0).toOpaque() }
            let rc = zoo_wget(handle, path, context == nil ? nil : Self.watcher, context, &buffer, &length, &stat)
            if rc != ZOK.rawValue, let context { Unmanaged<CoordinationWatch>.fromOpaque(context).release() }
            try check(rc, path)
            if Int(stat.dataLength) > capacity {
                capacity = Int(stat.dataLength)
                // The short read set the watch: the read again sets none (a second registration
                // of the same watcher and context fires once, and would leak its retain).
                watch = nil
                continue
            }
            let count = max(0, Int(length))
            return StoredData(data: buffer.prefix(count).map { UInt8(bitPattern: $0) }, version: stat.version)
        }
    }

    /// The per-call watcher: fires the watch passed as context, once.
    static let watcher: watcher_fn = { _, type, state, path, context in
        guard let context else { return }
        if type == CZooKeeper_session_event() {
            // Disconnections keep the watch (it fires after reconnecting); expiry ends it.
            guard state == CZooKeeper_expired_session_state() else { return }
            Unmanaged<CoordinationWatch>.fromOpaque(context).takeRetainedValue().fire(.sessionEnded)
            return
        }
        let where_ = path.map { String(cString: $0) } ?? ""
        let event: WatchEvent
        switch type {
        case CZooKeeper_created_event(): event = .created(where_)
        case CZooKeeper_deleted_event(): event = .deleted(where_)
        case CZooKeeper_changed_event(): event = .dataChanged(where_)
        default: event = .childrenChanged(where_)
        }
        Unmanaged<CoordinationWatch>.fromOpaque(context).takeRetainedValue().fire(event)
    }

    /// The node's data and version (`zoo_wget`, reading again with a larger buffer when the data
    /// exceeds 4 KiB).
    ///
    /// - Throws: `CoordinationError.noNode(_:)`, `sessionExpired`, `connectionLoss(_:)`.
    public func get(_ path: String) async throws(CoordinationError) -> StoredData {
        try read(path, watch: nil)
    }

    /// The node's data and version, and a one-shot watch that fires on its next change or
    /// deletion (or with `sessionEnded` when the session expires first).
    ///
    /// - Throws: `CoordinationError.noNode(_:)` (no watch is left set), `sessionExpired`,
    ///   `connectionLoss(_:)`.
    public func getAndWatch(_ path: String) async throws(CoordinationError) -> (StoredData, CoordinationWatch) {
        let watch = CoordinationWatch()
        return (try read(path, watch: watch), watch)
    }

    /// The node's version, or nil when it does not exist, and a one-shot watch on its creation,
    /// change or deletion (`zoo_wexists`).
    ///
    /// - Throws: `CoordinationError.sessionExpired`, `connectionLoss(_:)`.
    public func existsAndWatch(_ path: String) async throws(CoordinationError) -> (Int32?, CoordinationWatch) {
        try enter()
        defer { leave() }
        let watch = CoordinationWatch()
        let context = Unmanaged.passRetained(watch).toOpaque()
        var stat = Stat()
        let rc = zoo_wexists(handle, path, Self.watcher, context, &stat)
        if rc == ZNONODE.rawValue { return (nil, watch) }  // the watch stays set for the creation
        if rc != ZOK.rawValue { Unmanaged<CoordinationWatch>.fromOpaque(context).release() }
        try check(rc, path)
        return (stat.version, watch)
    }

    /// Replaces the node's data if it is at `expectedVersion` (any version when nil) (`zoo_set2`).
    ///
    /// - Parameters:
    ///   - path: the node.
    ///   - data: its new data.
    ///   - expectedVersion: the version it must be at; nil for any.
    /// - Returns: the node's new version.
    /// - Throws: `CoordinationError.badVersion(path:expected:actual:)` with the version found,
    ///   `noNode(_:)`, `sessionExpired`, `connectionLoss(_:)`.
    public func set(_ path: String, data: [UInt8], expectedVersion: Int32?) async throws(CoordinationError) -> Int32 {
        try enter()
        defer { leave() }
        var stat = Stat()
        let rc = data.withUnsafeBytes { bytes in
            zoo_set2(handle, path, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(data.count), expectedVersion ?? -1, &stat)
        }
        if rc == ZBADVERSION.rawValue { throw badVersion(path, expected: expectedVersion ?? -1) }
        try check(rc, path)
        return stat.version
    }

    /// Deletes the node if it is at `expectedVersion` (any version when nil) and has no children
    /// (`zoo_delete`).
    ///
    /// - Parameters:
    ///   - path: the node.
    ///   - expectedVersion: the version it must be at; nil for any.
    /// - Throws: `CoordinationError.badVersion(path:expected:actual:)`, `noNode(_:)`,
    ///   `notEmpty(_:)`, `sessionExpired`, `connectionLoss(_:)`.
    public func delete(_ path: String, expectedVersion: Int32?) async throws(CoordinationError) {
        try enter()
        defer { leave() }
        let rc = zoo_delete(handle, path, expectedVersion ?? -1)
        if rc == ZBADVERSION.rawValue { throw badVersion(path, expected: expectedVersion ?? -1) }
        try check(rc, path)
    }

    private func listChildren(_ path: String, watch: CoordinationWatch?) throws(CoordinationError) -> [String] {
        try enter()
        defer { leave() }
        var vector = String_vector()
        let context = watch.map { Unmanaged.passRetained($0).toOpaque() }
        let rc = zoo_wget_children(handle, path, context == nil ? nil : Self.watcher, context, &vector)
        if rc != ZOK.rawValue, let context { Unmanaged<CoordinationWatch>.fromOpaque(context).release() }
        try check(rc, path)
        defer { deallocate_String_vector(&vector) }
        return (0..<Int(vector.count)).map { String(cString: vector.data[$0]!) }.sorted()
    }

    /// The names (not paths) of the node's children, sorted (`zoo_wget_children`).
    ///
    /// - Throws: `CoordinationError.noNode(_:)`, `sessionExpired`, `connectionLoss(_:)`.
    public func children(_ path: String) async throws(CoordinationError) -> [String] {
        try listChildren(path, watch: nil)
    }

    /// The children's names, sorted, and a one-shot watch on the next change of the set of
    /// children (or the node's deletion).
    ///
    /// - Throws: `CoordinationError.noNode(_:)`, `sessionExpired`, `connectionLoss(_:)`.
    public func childrenAndWatch(_ path: String) async throws(CoordinationError) -> ([String], CoordinationWatch) {
        let watch = CoordinationWatch()
        return (try listChildren(path, watch: watch), watch)
    }

    /// Applies every operation in one transaction of the server (`zoo_multi`), or none of them;
    /// an empty list does nothing.
    ///
    /// - Throws: `CoordinationError.multiFailed(index:_:)` naming the first operation that failed
    ///   and its error (a stale version with the version found); `sessionExpired`;
    ///   `connectionLoss(_:)`, after which the operations may or may not have been applied.
    public func multi(_ operations: [CoordinationOperation]) async throws(CoordinationError) {
        try enter()
        defer { leave() }
        guard !operations.isEmpty else { return }
        // Keep every C string and buffer alive for the duration of the call.
        var strings: [UnsafeMutablePointer<CChar>] = []
        var buffers: [UnsafeMutableRawBufferPointer] = []
        defer {
            strings.forEach { free($0) }
            buffers.forEach { $0.deallocate() }
        }
        func cString(_ text: String) -> UnsafeMutablePointer<CChar> {
            let pointer = strdup(text)!
            strings.append(pointer)
            return pointer
        }
        func bytes(_ data: [UInt8]) -> UnsafePointer<CChar>? {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, data.count), alignment: 1)
            buffer.copyBytes(from: data)
            buffers.append(buffer)
            return UnsafePointer(buffer.baseAddress!.assumingMemoryBound(to: CChar.self))
        }
        var ops = [zoo_op_t](repeating: zoo_op_t(), count: operations.count)
        var results = [zoo_op_result_t](repeating: zoo_op_result_t(), count: operations.count)
        var createdPaths: [UnsafeMutablePointer<CChar>] = []
        var stats = [Stat](repeating: Stat(), count: operations.count)
        defer { createdPaths.forEach { $0.deallocate() } }
        for (index, operation) in operations.enumerated() {
            switch operation {
            case .create(let path, let data, let mode):
                let out = UnsafeMutablePointer<CChar>.allocate(capacity: path.utf8.count + 32)
                createdPaths.append(out)
                zoo_create_op_init(&ops[index], cString(path), bytes(data), Int32(data.count), CZooKeeper_open_acl(), flags(mode),
                                   out, Int32(path.utf8.count + 32))
            case .set(let path, let data, let expectedVersion):
                withUnsafeMutablePointer(to: &stats[index]) { stat in
                    zoo_set_op_init(&ops[index], cString(path), bytes(data), Int32(data.count), expectedVersion ?? -1, stat)
                }
            case .delete(let path, let expectedVersion):
                zoo_delete_op_init(&ops[index], cString(path), expectedVersion ?? -1)
            case .check(let path, let version):
                zoo_check_op_init(&ops[index], cString(path), version)
            }
        }
        let rc = zoo_multi(handle, Int32(operations.count), &ops, &results)
        guard rc != ZOK.rawValue else { return }
        // The first operation whose own result is not "rolled back" is the one that failed.
        let index = results.firstIndex { $0.err != ZOK.rawValue && $0.err != ZRUNTIMEINCONSISTENCY.rawValue } ?? 0
        let path: String
        switch operations[index] {
        case .create(let p, _, _), .set(let p, _, _), .delete(let p, _), .check(let p, _): path = p
        }
        let failure = results[index].err
        var error = Self.error(failure, path: path)
        if failure == ZBADVERSION.rawValue {
            let expected: Int32
            switch operations[index] {
            case .set(_, _, let v), .delete(_, let v): expected = v ?? -1
            case .check(_, let v): expected = v
            default: expected = -1
            }
            error = badVersion(path, expected: expected)
        }
        if failure == ZSESSIONEXPIRED.rawValue || rc == ZSESSIONEXPIRED.rawValue
            || (rc == ZINVALIDSTATE.rawValue && session.state.withLock({ $0.expired })) { throw .sessionExpired }
        if rc == ZCONNECTIONLOSS.rawValue { throw .connectionLoss("during a multi-operation") }
        throw .multiFailed(index: index, CoordinationFailure(error))
    }

    /// Ends the session (`zookeeper_close`) once the calls under way have returned: the server
    /// deletes its ephemeral nodes. Later calls fail with `CoordinationError.sessionExpired`.
    public func close() async {
        closeNow()
    }

    /// Calls in flight, and whether the session was closed. The C client's handle must not be
    /// used during or after `zookeeper_close`: a call after ``close()`` fails with
    /// `CoordinationError.sessionExpired` (as on the embedded store), and `close` waits for the
    /// calls under way to return.
    private let gate = Mutex<(closed: Bool, calls: Int)>((false, 0))

    private func enter() throws(CoordinationError) {
        let open = gate.withLock { gate -> Bool in
            guard !gate.closed else { return false }
            gate.calls += 1
            return true
        }
        guard open else { throw .sessionExpired }
    }

    private func leave() { gate.withLock { $0.calls -= 1 } }

    private func closeNow() {
        let first = gate.withLock { gate -> Bool in
            defer { gate.closed = true }
            return !gate.closed
        }
        guard first else { return }
        while gate.withLock({ $0.calls }) > 0 { usleep(1_000) }
        zookeeper_close(handle)
    }

    deinit { closeNow() }
}
