import Foundation

extension History {
    /// Parses a history in JSON Lines (one operation per line; blank lines are skipped).
    ///
    /// - Parameters:
    ///   - data: the file's bytes (UTF-8).
    ///   - file: the file's name, for error messages.
    /// - Throws: ``HistoryError`` with the 1-based line number and the problem: bad JSON (with the
    ///   column), a missing or mistyped field, an unknown `type`, a malformed micro-op, a
    ///   completion without an invoke, a second invoke while one is pending. Never traps.
    /// - Complexity: O(size of the data); large data is parsed in as many pieces, split at line
    ///   ends, as there are processors (about 2.5 s per 550 MB on 2 cores, release build).
    public static func parse(_ data: Data, file: String? = nil) throws(HistoryError) -> History {
        let chunks: [HistoryCoding.Chunk] = data.withUnsafeBytes { raw in
            HistoryCoding.parseChunks(raw.bindMemory(to: UInt8.self))
        }
        var operations: [HistoryOperation] = []
        var lines: [Int] = []
        operations.reserveCapacity(chunks.reduce(0) { $0 + $1.operations.count })
        lines.reserveCapacity(operations.capacity)
        var linesBefore = 0
        for chunk in chunks {
            if let failure = chunk.failure {
                throw HistoryError(file: file, line: linesBefore + failure.line, message: failure.message)
            }
            operations.append(contentsOf: chunk.operations)
            lines.append(contentsOf: chunk.lines.lazy.map { $0 + linesBefore })
            linesBefore += chunk.lineCount
        }
        return try History(operations: operations, lines: lines, file: file)
    }

    /// Reads and parses the history file at `path`.
    /// - Throws: ``HistoryError`` naming the file: unreadable, or malformed as ``parse(_:file:)`` says.
    public static func load(path: String) throws(HistoryError) -> History {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped)
        } catch {
            throw HistoryError(file: path, message: "cannot read the file: \((error as NSError).localizedDescription)")
        }
        return try parse(data, file: path)
    }

    /// The history as JSON Lines (each operation's ``HistoryOperation/jsonLine`` and a newline).
    /// - Complexity: O(size of the text).
    public func jsonLines() -> Data {
        var bytes: [UInt8] = []
        for operation in operations {
            HistoryCoding.appendLine(operation, to: &bytes)
            bytes.append(0x0A)
        }
        return Data(bytes)
    }
}

/// Reading and writing one history line.
enum HistoryCoding {
    /// The operations of a run of whole lines, with their line numbers counted from the run's
    /// start (1-based), or the first malformed line's number and problem.
    struct Chunk {
        var operations: [HistoryOperation] = []
        var lines: [Int] = []
        var lineCount = 0
        var failure: (line: Int, message: String)?
    }

    /// The text as pieces of whole lines (one per processor when it is large), parsed in parallel.
    static func parseChunks(_ bytes: UnsafeBufferPointer<UInt8>) -> [Chunk] {
        let pieces = bytes.count < 4 << 20 ? 1 : min(ProcessInfo.processInfo.activeProcessorCount, 16)
        var bounds = [0]
        for piece in 1..<max(pieces, 1) {
            var cut = max(bounds[bounds.count - 1], bytes.count * piece / pieces)
            while cut < bytes.count, bytes[cut] != 0x0A { cut += 1 }
            bounds.append(min(cut + 1, bytes.count))
        }
        bounds.append(bytes.count)
        if pieces <= 1 {
            return [parseLines(UnsafeBufferPointer(rebasing: bytes[0..<bytes.count]))]
        }
        // Each piece writes only its own slot.
        let results = UnsafeMutableBufferPointer<Chunk>.allocate(capacity: pieces)
        results.initialize(repeating: Chunk())
        defer { results.deinitialize(); results.deallocate() }
        let shared = SharedPieces(bytes: bytes, bounds: bounds, results: results)
        DispatchQueue.concurrentPerform(iterations: pieces) { piece in
            shared.results[piece] = parseLines(UnsafeBufferPointer(rebasing: shared.bytes[shared.bounds[piece]..<shared.bounds[piece + 1]]))
        }
        return Array(results)
    }

    /// What the parallel pieces share: the text (read only) and a result slot per piece.
    private struct SharedPieces: @unchecked Sendable {
        let bytes: UnsafeBufferPointer<UInt8>
        let bounds: [Int]
        let results: UnsafeMutableBufferPointer<Chunk>
    }

    /// Parses whole lines; blank ones are skipped (but counted).
    static func parseLines(_ bytes: UnsafeBufferPointer<UInt8>) -> Chunk {
        var chunk = Chunk()
        var lineStart = 0
        while lineStart < bytes.count {
            chunk.lineCount += 1
            var lineEnd = bytes.count
            if let base = bytes.baseAddress, let newline = memchr(base + lineStart, 0x0A, bytes.count - lineStart) {
                lineEnd = base.distance(to: newline.assumingMemoryBound(to: UInt8.self))
            }
            let line = UnsafeBufferPointer(rebasing: bytes[lineStart..<lineEnd])
            lineStart = lineEnd + 1
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
            do throws(HistoryError) {
                chunk.operations.append(try parseLine(line))
                chunk.lines.append(chunk.lineCount)
            } catch {
                chunk.failure = (chunk.lineCount, error.message)
                return chunk
            }
        }
        return chunk
    }

    static func parseLine(_ line: UnsafeBufferPointer<UInt8>) throws(HistoryError) -> HistoryOperation {
        var scanner = JSONScanner(line)
        let document: RawJSON
        do {
            document = try scanner.parseDocument()
        } catch {
            throw HistoryError(message: "bad JSON at column \(error.offset + 1): \(error.message)")
        }
        guard case .object(let members) = document else {
            throw HistoryError(message: "expected a JSON object, found \(document.typeName)")
        }
        func member(_ name: String) throws(HistoryError) -> RawJSON {
            for (key, value) in members where key == name { return value }
            throw HistoryError(message: "missing field \"\(name)\"")
        }
        func integer(_ name: String) throws(HistoryError) -> Int {
            let value = try member(name)
            guard case .int(let number) = value else {
                throw HistoryError(message: "field \"\(name)\" must be an integer, found \(value.typeName)")
            }
            return number
        }
        let index = try integer("index")
        let time = try integer("time")
        let process: HistoryProcess
        switch try member("process") {
        case .int(let id): process = .client(id)
        case .string("nemesis"): process = .nemesis
        case .string(let other): throw HistoryError(message: "field \"process\" must be an integer or \"nemesis\", found \"\(other)\"")
        case let other: throw HistoryError(message: "field \"process\" must be an integer or \"nemesis\", found \(other.typeName)")
        }
        let typeValue = try member("type")
        guard case .string(let typeName) = typeValue else {
            throw HistoryError(message: "field \"type\" must be a string, found \(typeValue.typeName)")
        }
        guard let type = OperationType(rawValue: typeName) else {
            throw HistoryError(message: "unknown type \"\(typeName)\" (expected invoke, ok, fail or info)")
        }
        let fValue = try member("f")
        guard case .string(let f) = fValue else {
            throw HistoryError(message: "field \"f\" must be a string, found \(fValue.typeName)")
        }
        let rawValue = try member("value")
        let value: OperationValue
        if case .nemesis = process {
            value = .json(rawValue.publicValue)
        } else if case .null = rawValue, type != .invoke {
            value = .json(.null)
        } else {
            value = .transaction(try microOps(rawValue, reading: type == .ok))
        }
        return HistoryOperation(index: index, process: process, type: type, f: f, value: value, time: time)
    }

    static func microOps(_ value: RawJSON, reading: Bool) throws(HistoryError) -> [MicroOp] {
        let elements: [RawJSON]
        switch value {
        case .ints([]): return []
        case .array(let array): elements = array
        case .ints: throw HistoryError(message: "field \"value\" must be a list of micro-ops such as [\"append\", 1, 2], found a list of integers")
        default: throw HistoryError(message: "field \"value\" must be a list of micro-ops, found \(value.typeName)")
        }
        var ops: [MicroOp] = []
        ops.reserveCapacity(elements.count)
        for (position, element) in elements.enumerated() {
            let which = "micro-op \(position + 1) of \"value\""
            guard case .array(let parts) = element, parts.count == 3 else {
                throw HistoryError(message: "\(which) must be a 3-element list [f, key, value]")
            }
            guard case .string(let function) = parts[0] else {
                throw HistoryError(message: "\(which): its function must be a string (\"append\", \"r\" or \"w\"), found \(parts[0].typeName)")
            }
            guard case .int(let key) = parts[1] else {
                throw HistoryError(message: "\(which): its key must be an integer, found \(parts[1].typeName)")
            }
            switch function {
            case "append", "w":
                guard case .int(let argument) = parts[2] else {
                    throw HistoryError(message: "\(which): the value of \"\(function)\" must be an integer, found \(parts[2].typeName)")
                }
                ops.append(function == "append" ? .append(key: key, value: argument) : .write(key: key, value: argument))
            case "r":
                switch parts[2] {
                case .null: ops.append(.read(key: key, value: nil))
                case .int(let register): ops.append(.read(key: key, value: .register(register)))
                case .ints(let list): ops.append(.read(key: key, value: .list(list)))
                case let other:
                    throw HistoryError(message: "\(which): a read's value must be null, an integer or a list of integers, found \(other.typeName)")
                }
            default:
                throw HistoryError(message: "\(which): unknown function \"\(function)\" (expected \"append\", \"r\" or \"w\")")
            }
        }
        return ops
    }

    /// Appends `operation` as one JSON line (without the newline).
    static func appendLine(_ operation: HistoryOperation, to bytes: inout [UInt8]) {
        bytes.append(contentsOf: "{\"index\": ".utf8)
        JSONText.appendInt(operation.index, to: &bytes)
        bytes.append(contentsOf: ", \"process\": ".utf8)
        switch operation.process {
        case .client(let id): JSONText.appendInt(id, to: &bytes)
        case .nemesis: bytes.append(contentsOf: "\"nemesis\"".utf8)
        }
        bytes.append(contentsOf: ", \"type\": \"".utf8)
        bytes.append(contentsOf: operation.type.rawValue.utf8)
        bytes.append(contentsOf: "\", \"f\": ".utf8)
        JSONText.appendString(operation.f, to: &bytes)
        bytes.append(contentsOf: ", \"value\": ".utf8)
        switch operation.value {
        case .json(let value): JSONText.append(value, to: &bytes)
        case .transaction(let ops):
            bytes.append(UInt8(ascii: "["))
            for (position, op) in ops.enumerated() {
                if position > 0 { bytes.append(contentsOf: ", ".utf8) }
                appendMicroOp(op, to: &bytes)
            }
            bytes.append(UInt8(ascii: "]"))
        }
        bytes.append(contentsOf: ", \"time\": ".utf8)
        JSONText.appendInt(operation.time, to: &bytes)
        bytes.append(UInt8(ascii: "}"))
    }

    static func appendMicroOp(_ op: MicroOp, to bytes: inout [UInt8]) {
        switch op {
        case .append(let key, let value):
            bytes.append(contentsOf: "[\"append\", ".utf8)
            JSONText.appendInt(key, to: &bytes)
            bytes.append(contentsOf: ", ".utf8)
            JSONText.appendInt(value, to: &bytes)
        case .write(let key, let value):
            bytes.append(contentsOf: "[\"w\", ".utf8)
            JSONText.appendInt(key, to: &bytes)
            bytes.append(contentsOf: ", ".utf8)
            JSONText.appendInt(value, to: &bytes)
        case .read(let key, let value):
            bytes.append(contentsOf: "[\"r\", ".utf8)
            JSONText.appendInt(key, to: &bytes)
            bytes.append(contentsOf: ", ".utf8)
            switch value {
            case nil: bytes.append(contentsOf: "null".utf8)
            case .register(let register): JSONText.appendInt(register, to: &bytes)
            case .list(let list):
                bytes.append(UInt8(ascii: "["))
                for (position, element) in list.enumerated() {
                    if position > 0 { bytes.append(contentsOf: ", ".utf8) }
                    JSONText.appendInt(element, to: &bytes)
                }
                bytes.append(UInt8(ascii: "]"))
            }
        }
        bytes.append(UInt8(ascii: "]"))
    }
}
