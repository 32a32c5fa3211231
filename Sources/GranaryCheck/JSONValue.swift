/// Any JSON value: what a nemesis operation carries as its `value` (a node id, a list of nodes,
/// null, ...). Transactions' values are parsed into ``MicroOp``s instead.
public enum JSONValue: Sendable, Hashable, Codable, CustomStringConvertible {
    /// `null`.
    case null
    /// `true` or `false`.
    case bool(Bool)
    /// An integral number that fits `Int`.
    case int(Int)
    /// Any other number.
    case double(Double)
    /// A string.
    case string(String)
    /// An array, its elements in order.
    case array([JSONValue])
    /// An object, by member name.
    case object([String: JSONValue])

    /// Decodes whatever JSON value the decoder holds, trying in turn null, a Boolean, an integer,
    /// a double, a string, an array and an object.
    ///
    /// - Throws: `DecodingError` when the value is none of these.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Int.self) {
            self = .int(value)
        } else if let value = try? container.decode(Double.self) {
            self = .double(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    /// Encodes the value as the JSON value it is.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .int(let value): try container.encode(value)
        case .double(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }

    /// The value as compact JSON text (object keys sorted, so the text is deterministic).
    public var description: String {
        var bytes: [UInt8] = []
        JSONText.append(self, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Writing JSON text into a byte buffer (the history writer's and the renderers' shared code).
enum JSONText {
    static func append(_ value: JSONValue, to bytes: inout [UInt8]) {
        switch value {
        case .null: bytes.append(contentsOf: "null".utf8)
        case .bool(let flag): bytes.append(contentsOf: (flag ? "true" : "false").utf8)
        case .int(let number): appendInt(number, to: &bytes)
        case .double(let number):
            if number.isFinite {
                bytes.append(contentsOf: "\(number)".utf8)
            } else {
                bytes.append(contentsOf: "null".utf8)
            }
        case .string(let text): appendString(text, to: &bytes)
        case .array(let elements):
            bytes.append(UInt8(ascii: "["))
            for (position, element) in elements.enumerated() {
                if position > 0 { bytes.append(contentsOf: ", ".utf8) }
                append(element, to: &bytes)
            }
            bytes.append(UInt8(ascii: "]"))
        case .object(let members):
            bytes.append(UInt8(ascii: "{"))
            for (position, key) in members.keys.sorted().enumerated() {
                if position > 0 { bytes.append(contentsOf: ", ".utf8) }
                appendString(key, to: &bytes)
                bytes.append(contentsOf: ": ".utf8)
                append(members[key]!, to: &bytes)
            }
            bytes.append(UInt8(ascii: "}"))
        }
    }

    /// Appends the decimal digits of `number` (no allocation).
    static func appendInt(_ number: Int, to bytes: inout [UInt8]) {
        if number == 0 {
            bytes.append(UInt8(ascii: "0"))
            return
        }
        var magnitude = number.magnitude
        if number < 0 { bytes.append(UInt8(ascii: "-")) }
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var count = 0
        withUnsafeMutableBytes(of: &digits) { buffer in
            while magnitude > 0 {
                buffer[count] = UInt8(ascii: "0") + UInt8(magnitude % 10)
                magnitude /= 10
                count += 1
            }
            for position in stride(from: count - 1, through: 0, by: -1) {
                bytes.append(buffer[position])
            }
        }
    }

    static func appendString(_ text: String, to bytes: inout [UInt8]) {
        bytes.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes.append(contentsOf: "\\\"".utf8)
            case UInt8(ascii: "\\"): bytes.append(contentsOf: "\\\\".utf8)
            case UInt8(ascii: "\n"): bytes.append(contentsOf: "\\n".utf8)
            case UInt8(ascii: "\r"): bytes.append(contentsOf: "\\r".utf8)
            case UInt8(ascii: "\t"): bytes.append(contentsOf: "\\t".utf8)
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes.append(contentsOf: "\\u00".utf8)
                bytes.append(hex[Int(byte >> 4)])
                bytes.append(hex[Int(byte & 15)])
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

/// A parsed JSON value, internal to the history parser: objects keep their members in order as
/// pairs, and an array of integers only is kept as `[Int]` (a read of thousands of elements is
/// one allocation, not thousands of enum values).
enum RawJSON {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case ints([Int])
    case array([RawJSON])
    case object([(String, RawJSON)])

    var publicValue: JSONValue {
        switch self {
        case .null: .null
        case .bool(let flag): .bool(flag)
        case .int(let number): .int(number)
        case .double(let number): .double(number)
        case .string(let text): .string(text)
        case .ints(let numbers): .array(numbers.map { .int($0) })
        case .array(let elements): .array(elements.map(\.publicValue))
        case .object(let members):
            .object(Dictionary(members.map { ($0.0, $0.1.publicValue) }, uniquingKeysWith: { _, last in last }))
        }
    }

    /// A short name of the value's type, for error messages.
    var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .int: "an integer"
        case .double: "a non-integer number"
        case .string: "a string"
        case .ints, .array: "an array"
        case .object: "an object"
        }
    }
}

/// A JSON syntax error: what was wrong and the byte offset (within the line) where.
struct JSONSyntaxError: Error {
    var message: String
    var offset: Int
}

/// A recursive-descent JSON scanner over UTF-8 bytes (one line of a history). Never traps on bad
/// input: every malformation is a ``JSONSyntaxError``; nesting deeper than 256 is refused.
struct JSONScanner {
    let bytes: UnsafeBufferPointer<UInt8>
    var position = 0

    init(_ bytes: UnsafeBufferPointer<UInt8>) {
        self.bytes = bytes
    }

    /// Parses one whole document: a value, then only white space.
    mutating func parseDocument() throws(JSONSyntaxError) -> RawJSON {
        let value = try parseValue(depth: 0)
        skipWhitespace()
        if position < bytes.count {
            throw JSONSyntaxError(message: "unexpected '\(Self.show(bytes[position]))' after the JSON value", offset: position)
        }
        return value
    }

    mutating func skipWhitespace() {
        while position < bytes.count {
            let byte = bytes[position]
            if byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D {
                position += 1
            } else {
                return
            }
        }
    }

    static func show(_ byte: UInt8) -> String {
        byte >= 0x20 && byte < 0x7F ? String(UnicodeScalar(byte)) : "\\x" + String(byte, radix: 16)
    }

    mutating func expectLiteral(_ literal: StaticString) throws(JSONSyntaxError) {
        let start = position
        let count = literal.utf8CodeUnitCount
        guard position + count <= bytes.count else {
            throw JSONSyntaxError(message: "invalid literal (expected \(literal))", offset: start)
        }
        let pointer = literal.utf8Start
        for offset in 0..<count where bytes[position + offset] != pointer[offset] {
            throw JSONSyntaxError(message: "invalid literal (expected \(literal))", offset: start)
        }
        position += count
    }

    mutating func parseValue(depth: Int) throws(JSONSyntaxError) -> RawJSON {
        skipWhitespace()
        guard position < bytes.count else { throw JSONSyntaxError(message: "unexpected end of line", offset: position) }
        guard depth < 256 else { throw JSONSyntaxError(message: "nesting deeper than 256", offset: position) }
        switch bytes[position] {
        case UInt8(ascii: "{"): return try parseObject(depth: depth)
        case UInt8(ascii: "["): return try parseArray(depth: depth)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "n"): try expectLiteral("null"); return .null
        case UInt8(ascii: "t"): try expectLiteral("true"); return .bool(true)
        case UInt8(ascii: "f"): try expectLiteral("false"); return .bool(false)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        case let byte: throw JSONSyntaxError(message: "unexpected '\(Self.show(byte))'", offset: position)
        }
    }

    mutating func parseObject(depth: Int) throws(JSONSyntaxError) -> RawJSON {
        position += 1  // {
        var members: [(String, RawJSON)] = []
        skipWhitespace()
        if position < bytes.count, bytes[position] == UInt8(ascii: "}") {
            position += 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard position < bytes.count, bytes[position] == UInt8(ascii: "\"") else {
                throw JSONSyntaxError(message: "expected a member name in quotes", offset: position)
            }
            let name = try parseString()
            skipWhitespace()
            guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else {
                throw JSONSyntaxError(message: "expected ':' after member name \"\(name)\"", offset: position)
            }
            position += 1
            members.append((name, try parseValue(depth: depth + 1)))
            skipWhitespace()
            guard position < bytes.count else { throw JSONSyntaxError(message: "unterminated object", offset: position) }
            if bytes[position] == UInt8(ascii: ",") {
                position += 1
            } else if bytes[position] == UInt8(ascii: "}") {
                position += 1
                return .object(members)
            } else {
                throw JSONSyntaxError(message: "expected ',' or '}' in object", offset: position)
            }
        }
    }

    mutating func parseArray(depth: Int) throws(JSONSyntaxError) -> RawJSON {
        position += 1  // [
        skipWhitespace()
        if position < bytes.count, bytes[position] == UInt8(ascii: "]") {
            position += 1
            return .ints([])
        }
        // Integers only, as long as possible (a read list).
        var ints: [Int] = []
        var general: [RawJSON]? = nil
        while true {
            let value = try parseValue(depth: depth + 1)
            if general == nil, case .int(let number) = value {
                ints.append(number)
            } else {
                if general == nil {
                    general = ints.map { .int($0) }
                    ints = []
                }
                general!.append(value)
            }
            skipWhitespace()
            guard position < bytes.count else { throw JSONSyntaxError(message: "unterminated array", offset: position) }
            if bytes[position] == UInt8(ascii: ",") {
                position += 1
            } else if bytes[position] == UInt8(ascii: "]") {
                position += 1
                if let general { return .array(general) }
                return .ints(ints)
            } else {
                throw JSONSyntaxError(message: "expected ',' or ']' in array", offset: position)
            }
        }
    }

    mutating func parseNumber() throws(JSONSyntaxError) -> RawJSON {
        let start = position
        var negative = false
        if bytes[position] == UInt8(ascii: "-") {
            negative = true
            position += 1
        }
        let digitsStart = position
        var magnitude: UInt64 = 0
        var overflow = false
        while position < bytes.count, bytes[position] >= UInt8(ascii: "0"), bytes[position] <= UInt8(ascii: "9") {
            let (times10, o1) = magnitude.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(bytes[position] - UInt8(ascii: "0")))
            overflow = overflow || o1 || o2
            magnitude = sum
            position += 1
        }
        guard position > digitsStart else { throw JSONSyntaxError(message: "a number needs digits", offset: start) }
        if bytes[digitsStart] == UInt8(ascii: "0"), position - digitsStart > 1 {
            throw JSONSyntaxError(message: "a number has a leading zero", offset: start)
        }
        var isInteger = true
        if position < bytes.count, bytes[position] == UInt8(ascii: ".") {
            isInteger = false
            position += 1
            let fractionStart = position
            while position < bytes.count, bytes[position] >= UInt8(ascii: "0"), bytes[position] <= UInt8(ascii: "9") { position += 1 }
            guard position > fractionStart else { throw JSONSyntaxError(message: "a fraction needs digits", offset: start) }
        }
        if position < bytes.count, bytes[position] == UInt8(ascii: "e") || bytes[position] == UInt8(ascii: "E") {
            isInteger = false
            position += 1
            if position < bytes.count, bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-") { position += 1 }
            let exponentStart = position
            while position < bytes.count, bytes[position] >= UInt8(ascii: "0"), bytes[position] <= UInt8(ascii: "9") { position += 1 }
            guard position > exponentStart else { throw JSONSyntaxError(message: "an exponent needs digits", offset: start) }
        }
        if isInteger && !overflow {
            if negative {
                if magnitude <= UInt64(Int.max) + 1 { return .int(magnitude == UInt64(Int.max) + 1 ? Int.min : -Int(magnitude)) }
            } else if magnitude <= UInt64(Int.max) {
                return .int(Int(magnitude))
            }
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        guard let number = Double(text) else { throw JSONSyntaxError(message: "invalid number \(text)", offset: start) }
        return .double(number)
    }

    mutating func parseString() throws(JSONSyntaxError) -> String {
        let start = position
        position += 1  // "
        var scalars: [UInt8] = []
        var segmentStart = position
        while true {
            guard position < bytes.count else { throw JSONSyntaxError(message: "unterminated string", offset: start) }
            let byte = bytes[position]
            if byte == UInt8(ascii: "\"") {
                scalars.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[segmentStart..<position]))
                position += 1
                break
            }
            if byte < 0x20 {
                throw JSONSyntaxError(message: "a control character in a string", offset: position)
            }
            if byte == UInt8(ascii: "\\") {
                scalars.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[segmentStart..<position]))
                position += 1
                guard position < bytes.count else { throw JSONSyntaxError(message: "unterminated string", offset: start) }
                let escaped = bytes[position]
                position += 1
                switch escaped {
                case UInt8(ascii: "\""): scalars.append(UInt8(ascii: "\""))
                case UInt8(ascii: "\\"): scalars.append(UInt8(ascii: "\\"))
                case UInt8(ascii: "/"): scalars.append(UInt8(ascii: "/"))
                case UInt8(ascii: "b"): scalars.append(0x08)
                case UInt8(ascii: "f"): scalars.append(0x0C)
                case UInt8(ascii: "n"): scalars.append(0x0A)
                case UInt8(ascii: "r"): scalars.append(0x0D)
                case UInt8(ascii: "t"): scalars.append(0x09)
                case UInt8(ascii: "u"):
                    var code = try parseHex4()
                    if code >= 0xD800, code < 0xDC00 {
                        // A surrogate pair: \uD83D\uDE00.
                        guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                            throw JSONSyntaxError(message: "an unpaired surrogate in a string", offset: position)
                        }
                        position += 2
                        let low = try parseHex4()
                        guard low >= 0xDC00, low < 0xE000 else { throw JSONSyntaxError(message: "an invalid surrogate pair in a string", offset: position) }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    }
                    guard let scalar = Unicode.Scalar(code) else { throw JSONSyntaxError(message: "an invalid \\u escape", offset: position) }
                    scalars.append(contentsOf: String(Character(scalar)).utf8)
                default:
                    throw JSONSyntaxError(message: "an invalid escape '\\\(Self.show(escaped))' in a string", offset: position - 1)
                }
                segmentStart = position
                continue
            }
            position += 1
        }
        return String(decoding: scalars, as: UTF8.self)
    }

    mutating func parseHex4() throws(JSONSyntaxError) -> UInt32 {
        guard position + 4 <= bytes.count else { throw JSONSyntaxError(message: "a \\u escape needs 4 hex digits", offset: position) }
        var code: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[position]
            let digit: UInt32
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(byte - UInt8(ascii: "A") + 10)
            default: throw JSONSyntaxError(message: "a \\u escape needs 4 hex digits", offset: position)
            }
            code = code << 4 | digit
            position += 1
        }
        return code
    }
}
