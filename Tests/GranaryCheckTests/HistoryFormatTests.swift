import Foundation
import GranaryCheck
import Testing

@Suite("History format: parser and writer")
struct HistoryFormatTests {
    @Test("the documented line parses into the model")
    func documentedLine() throws {
        let text = """
            {"index": 7, "process": 2, "type": "invoke", "f": "txn", "value": [["append", 5, 12], ["r", 7, null]], "time": 123456789}
            {"index": 8, "process": "nemesis", "type": "info", "f": "crash", "value": {"node": 2}, "time": 123456790}
            {"index": 9, "process": 2, "type": "ok", "f": "txn", "value": [["append", 5, 12], ["r", 7, [1, 2]]], "time": 123456800}
            {"index": 10, "process": 3, "type": "invoke", "f": "txn", "value": [["w", 1, 4], ["r", 1, null]], "time": 123456801}
            {"index": 11, "process": 3, "type": "ok", "f": "txn", "value": [["w", 1, 4], ["r", 1, 4]], "time": 123456802}
            """
        let history = try History.parse(Data(text.utf8))
        #expect(history.operations.count == 5)
        #expect(history.operations[0] == .transaction(index: 7, process: 2, type: .invoke,
                                                      ops: [.append(key: 5, value: 12), .read(key: 7, value: nil)], time: 123_456_789))
        #expect(history.nemesisEvents == [.nemesis(index: 8, f: "crash", value: .object(["node": .int(2)]), time: 123_456_790)])
        #expect(history.transactions.count == 2)
        #expect(history.transactions[0].status == .ok)
        #expect(history.transactions[0].ops == [.append(key: 5, value: 12), .read(key: 7, value: .list([1, 2]))])
        #expect(history.transactions[1].ops == [.write(key: 1, value: 4), .read(key: 1, value: .register(4))])
        #expect(history.operations[0].jsonLine == text.split(separator: "\n")[0].description)
    }

    @Test("writing then parsing gives the same operations")
    func roundTrip() throws {
        var operations = HistoryGenerator(.init(transactions: 500, processes: 5, keys: 5, failFraction: 0.05, infoFraction: 0.05,
                                                nemesisEvents: 3)).listAppend()
        operations.append(.nemesis(index: operations.count, f: "pause", value: .array([.string("n1 \"quoted\"\n"), .null, .bool(true), .double(1.5)]), time: Int.max))
        let history = try History(operations: operations)
        let parsed = try History.parse(history.jsonLines())
        #expect(parsed.operations == operations)
        #expect(check(history: parsed).isValid)
    }

    @Test("malformed lines: the error names the line and the problem", arguments: [
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 1}\n{\"index\": 1, bad", 2, "bad JSON at column 14"),
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": []}", 1, "missing field \"time\""),
        ("{\"index\": 0, \"process\": 1, \"type\": \"maybe\", \"f\": \"txn\", \"value\": [], \"time\": 1}", 1, "unknown type \"maybe\""),
        ("{\"index\": 0, \"process\": 1, \"type\": \"ok\", \"f\": \"txn\", \"value\": [], \"time\": 1}", 1, "ok of process 1 without a pending invoke"),
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 1}\n{\"index\": 1, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 2}", 2, "invokes again while its invoke at line 1 is pending"),
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [[\"push\", 1, 2]], \"time\": 1}", 1, "micro-op 1 of \"value\": unknown function \"push\""),
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [[\"r\", 1, \"x\"]], \"time\": 1}", 1, "a read's value must be null, an integer or a list of integers, found a string"),
        ("{\"index\": 0, \"process\": \"bob\", \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 1}", 1, "field \"process\" must be an integer or \"nemesis\""),
        ("{\"index\": \"0\", \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 1}", 1, "field \"index\" must be an integer, found a string"),
        ("[1, 2, 3]", 1, "expected a JSON object, found an array"),
        ("\n\n{\"index\": 0", 3, "bad JSON"),
        ("{\"index\": 0, \"process\": 1, \"type\": \"invoke\", \"f\": \"txn\", \"value\": [], \"time\": 1} x", 1, "unexpected 'x' after the JSON value"),
        (String(repeating: "[", count: 10_000), 1, "nesting deeper than 256"),
    ] as [(String, Int, String)])
    func malformed(text: String, line: Int, problem: String) {
        do {
            _ = try History.parse(Data(text.utf8), file: "h.jsonl")
            Issue.record("parsed a malformed history")
        } catch {
            #expect(error.line == line)
            #expect(error.description.hasPrefix("h.jsonl:\(line): "))
            #expect(error.message.contains(problem), "\(error)")
        }
    }

    @Test("a large file is parsed in pieces; an error deep inside still names its line")
    func largeFileLineNumbers() throws {
        var text = ""
        for process in 0..<60_000 {
            text += "{\"index\": \(2 * process), \"process\": \(process), \"type\": \"invoke\", \"f\": \"txn\", \"value\": [[\"append\", 1, \(process)]], \"time\": \(2 * process)}\n"
            if process % 1000 == 0 { text += "\n" }
        }
        let history = try History.parse(Data(text.utf8))
        #expect(history.operations.count == 60_000)
        #expect(history.transactions.count == 60_000)
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        lines[50_001] = "{oops"
        do {
            _ = try History.parse(Data(lines.joined(separator: "\n").utf8))
            Issue.record("parsed a malformed history")
        } catch {
            #expect(error.line == 50_002)
            #expect(error.message.contains("bad JSON at column 2"))
        }
    }

    @Test("an unreadable file is an error naming the file")
    func unreadable() {
        #expect(throws: HistoryError.self) { try History.load(path: "/nonexistent/history.jsonl") }
        do {
            _ = try History.load(path: "/nonexistent/history.jsonl")
        } catch {
            #expect(error.description.hasPrefix("/nonexistent/history.jsonl: cannot read the file"))
        }
    }

    @Test("the writer records from many threads: whole lines, indices in order, times non-decreasing")
    func concurrentWriter() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("granary-check-writer-\(getpid()).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let writer = try HistoryWriter(path: path, keepInMemory: true)
        writer.nemesis("crash", value: .int(1))
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            for counter in 0..<300 {
                let ops: [MicroOp] = [.append(key: thread, value: counter), .read(key: 100 + thread, value: nil)]
                writer.invoke(process: thread, ops: ops)
                if counter % 50 == 7 {
                    writer.complete(process: thread, type: .info, ops: nil)
                } else {
                    writer.complete(process: thread, type: .ok, ops: [ops[0], .read(key: 100 + thread, value: .list([]))])
                }
            }
        }
        try writer.close()
        let fromFile = try History.load(path: path)
        let inMemory = try writer.history()
        #expect(fromFile.operations == inMemory.operations)
        #expect(fromFile.operations.map(\.index) == Array(0..<(1 + 8 * 600)))
        #expect(zip(fromFile.operations, fromFile.operations.dropFirst()).allSatisfy { $0.time <= $1.time })
        #expect(fromFile.transactions.count == 8 * 300)
        #expect(fromFile.transactions.filter { $0.status == .info }.allSatisfy { $0.ops.count == 2 })
        let report = check(history: fromFile)
        #expect(report.isValid, "\(report)")
        #expect(report.nemesisCount == 1)
    }
}
