import Foundation
import Synchronization

/// Records a history as a workload runs, from any number of threads: to a file (JSON Lines,
/// the format ``History/parse(_:file:)`` reads), in memory, or both.
///
/// Thread-safe. One lock guards all state, and its invariant is: the operations recorded so
/// far have indices 0, 1, 2, ... in the order recorded, their times never decrease in that
/// order, the file (when there is one) holds exactly the first `written` of them as whole
/// lines followed by the buffer's bytes for the rest, and `pending` maps each client process
/// with an invoke not yet completed to that invoke. Index and time are taken under the lock,
/// so a completion recorded after an invoke by any thread has a later index and time: the
/// recorded order is a real-time order, which is what the checker's realtime edges rely on.
///
/// Lines are buffered (64 KiB) and written with `FileHandle.write`; call ``flush()`` (or
/// ``close()``) before reading the file. Recording never throws; a failed write is kept and
/// rethrown by ``flush()``/``close()``.
public final class HistoryWriter: Sendable {
    private struct State {
        var handle: FileHandle?
        var buffer: [UInt8] = []
        var nextIndex = 0
        var lastTime = 0
        var kept: [HistoryOperation]?
        var pending: [Int: HistoryOperation] = [:]
        var writeError: (any Error)?
        var closed = false
    }

    private let state: Mutex<State>
    private let clock: @Sendable () -> Int

    /// A writer to `handle` (the caller opens it; ``close()`` closes it), keeping the operations
    /// in memory too when `keepInMemory` (see ``history()``).
    /// - Parameters:
    ///   - handle: where the lines go; nil writes no file.
    ///   - keepInMemory: whether ``history()`` can return the operations afterwards.
    ///   - clock: monotonic nanoseconds; the default is `DispatchTime.now()`'s.
    public init(handle: FileHandle?, keepInMemory: Bool = false,
                clock: @escaping @Sendable () -> Int = { Int(truncatingIfNeeded: DispatchTime.now().uptimeNanoseconds) }) {
        var initial = State()
        initial.handle = handle
        initial.kept = keepInMemory || handle == nil ? [] : nil
        state = Mutex(initial)
        self.clock = clock
    }

    /// A writer that creates (or truncates) the file at `path`.
    /// - Throws: the file system's error when the file cannot be created.
    public convenience init(path: String, keepInMemory: Bool = false) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else {
            throw HistoryError(file: path, message: "cannot create the file")
        }
        self.init(handle: try FileHandle(forWritingTo: URL(fileURLWithPath: path)), keepInMemory: keepInMemory)
    }

    /// A writer that only keeps the operations in memory (check them with ``history()``).
    public static func inMemory() -> HistoryWriter { HistoryWriter(handle: nil, keepInMemory: true) }

    /// Records client `process`'s invoke of a transaction (reads carry `nil`) and returns the
    /// operation recorded (its index and time).
    @discardableResult
    public func invoke(process: Int, ops: [MicroOp], f: String = "txn") -> HistoryOperation {
        record(process: .client(process), type: .invoke, f: f, value: .transaction(ops))
    }

    /// Records the completion of `process`'s pending invoke: `ok` with the micro-ops as executed
    /// (reads carrying what they read), `fail`, or `info` (outcome unknown); `ops` `nil` repeats
    /// the invoke's. `type` must not be `invoke` (a precondition: a runner's bug traps).
    @discardableResult
    public func complete(process: Int, type: OperationType, ops: [MicroOp]?, f: String = "txn") -> HistoryOperation {
        precondition(type != .invoke, "complete(process:type:ops:) records ok, fail or info")
        return record(process: .client(process), type: type, f: f, value: ops.map { .transaction($0) }, fallbackToInvoke: true)
    }

    /// Records a nemesis event (a fault: `"crash"`, `"restart"`, `"pause"`, ...).
    @discardableResult
    public func nemesis(_ f: String, value: JSONValue = .null, type: OperationType = .info) -> HistoryOperation {
        record(process: .nemesis, type: type, f: f, value: .json(value))
    }

    /// Records any operation, giving it the next index and the current time.
    @discardableResult
    public func record(process: HistoryProcess, type: OperationType, f: String, value: OperationValue) -> HistoryOperation {
        record(process: process, type: type, f: f, value: value, fallbackToInvoke: false)
    }

    private func record(process: HistoryProcess, type: OperationType, f: String, value: OperationValue?, fallbackToInvoke: Bool) -> HistoryOperation {
        state.withLock { state in
            let now = max(clock(), state.lastTime)
            state.lastTime = now
            var resolved = value ?? .json(.null)
            if case .client(let id) = process {
                if type == .invoke {
                    state.pending[id] = HistoryOperation(index: state.nextIndex, process: process, type: type, f: f, value: resolved, time: now)
                } else if let invoke = state.pending.removeValue(forKey: id), value == nil, fallbackToInvoke {
                    resolved = invoke.value
                }
            }
            let operation = HistoryOperation(index: state.nextIndex, process: process, type: type, f: f, value: resolved, time: now)
            state.nextIndex += 1
            state.kept?.append(operation)
            if state.handle != nil, !state.closed {
                HistoryCoding.appendLine(operation, to: &state.buffer)
                state.buffer.append(0x0A)
                if state.buffer.count >= 64 << 10 { Self.drain(&state) }
            }
            return operation
        }
    }

    private static func drain(_ state: inout State) {
        guard let handle = state.handle, !state.buffer.isEmpty else { return }
        do {
            try handle.write(contentsOf: state.buffer)
        } catch {
            if state.writeError == nil { state.writeError = error }
        }
        state.buffer.removeAll(keepingCapacity: true)
    }

    /// Writes the buffered lines to the file.
    /// - Throws: the first write error since the writer was made.
    public func flush() throws {
        let error: (any Error)? = state.withLock { state in
            Self.drain(&state)
            return state.writeError
        }
        if let error { throw error }
    }

    /// Flushes and closes the file; later records are kept in memory only (if kept at all).
    /// - Throws: the first write error, or the close's.
    public func close() throws {
        let error: (any Error)? = state.withLock { state in
            Self.drain(&state)
            if let handle = state.handle, !state.closed {
                state.closed = true
                do { try handle.close() } catch { if state.writeError == nil { state.writeError = error } }
            }
            return state.writeError
        }
        if let error { throw error }
    }

    /// The operations recorded so far (empty unless kept in memory).
    public var operations: [HistoryOperation] { state.withLock { $0.kept ?? [] } }

    /// The operations recorded so far as a ``History``, ready for ``check(history:options:)``.
    /// - Throws: ``HistoryError`` when a completion had no invoke (a runner's bug).
    public func history() throws(HistoryError) -> History { try History(operations: operations) }
}
